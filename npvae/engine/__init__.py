"""The engine: how npvae is made fast. Read after the rest.

It imports the reference (npvae.layers, distributions, model, optim, evaluate,
data); the reference never imports it. Each piece names the reference function
it equals, and tests/test_engine_*.py hold the two against each other.

    kernels    the Bernoulli in fewer passes, sigma formed once, bias sums by BLAS
    model      FastVAE (= VAE): aligned or shared buffers, replicas, row bindings, SplitBatch
    optim      FlatAdam (= Adam): scaled moments, one axpy per moment, ranges of a flat buffer
    binarize   dynamic binarization keyed by rows (= data.binarize in distribution), Prepare
    parallel   helper threads, forked helper processes synchronized by semaphores, BLAS threads
    step       make_step (= train.reference_step): one training step split over threads or processes
    evaluate   log_likelihood (= evaluate.log_likelihood) with the examples split over threads
    bench      npvae bench
"""
