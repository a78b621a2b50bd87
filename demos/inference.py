"""Learning without an encoder, and in between: per-datapoint, amortized and semi-amortized inference.

The same decoder (784-200-200-50 tanh, Bernoulli, dynamically binarized MNIST, batch 100, Adam
1e-3) is trained three ways (npvae.inference), each for the same training wall time:

    amortized        q = the encoder's                                         (the VAE)
    per-datapoint    q = a row of a table started at the prior, INNER_STEPS     (the seed's algorithm)
                     Adam steps per visit, no encoder
    semi-amortized   q = the encoder's, then INNER_STEPS Adam steps; theta      (Krishnan et al. 2018;
                     steps at the refined q, the encoder on its own ELBO         no gradient through the steps)

The three train in turns of one epoch each (the one with the least training time goes next), so
that the load of other work on the machine falls on all three alike. Every epoch is 590 theta
steps for all three, so "the same epoch" is "the same number of theta steps". The parameters are
kept after every epoch and scored afterwards (scoring is not in the budget): test log p(x) by
importance sampling from each run's own q, the test ELBO at that q, and the amortization gap
ELBO(q*) - ELBO(own q), q* = 300 more Adam steps on each test image alone (inference.amortization_gap).
Then a Z = 2 semi-amortized model shows, for a few test digits, the encoder's q and the refined q
over the exact posterior (quadrature).

    python demos/inference.py [--quick] [--out DIR] [--data-dir DIR]
"""
import os

# One BLAS thread: OpenBLAS's threads spin while they wait, and on 2 cores shared with other
# work that made small products up to 16x slower (see demos/amortization.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import time
from pathlib import Path

import numpy as np

from npvae import data as datasets
from npvae import distributions as dist
from npvae import evaluate, inference, plots
from npvae.train import TrainConfig, Trainer, test_set

DATASET, FALLBACK = "mnist", "shapes"
HIDDEN, Z_DIM, ACTIVATION = (200, 200), 50, "tanh"      # Burda et al.'s one-layer model
BATCH, LR, N_VALID, QUICK_N_VALID = 100, 1e-3, 1000, 100
INNER_STEPS = {"per-datapoint": 5, "semi-amortized": 20}   # S = 5 for both: gap 4.84 vs 4.75 (docs/results.md)
INNER_LR = {"per-datapoint": 0.2, "semi-amortized": 0.05}
METHODS = ("amortized", "per-datapoint", "semi-amortized")
BUDGET, QUICK_BUDGET = 200.0, 0.6                       # training seconds per method
QUICK_N_TRAIN = 1000
N_TEST, QUICK_N_TEST = 300, 40          # test images for the final figures (every 33rd: all digits)
K_FINAL, QUICK_K_FINAL = 5000, 50
N_CURVE, QUICK_N_CURVE = 200, 30        # test images and K for the curve of log p(x) against time
K_CURVE, QUICK_K_CURVE = 500, 20
CURVE_POINTS = 7                        # epochs scored per method for the curve (and the last)
N_GAP, QUICK_N_GAP = 100, 10            # test images for the amortization gap
GAP_STEPS, QUICK_GAP_STEPS = 300, 20
N_EVAL, QUICK_N_EVAL = 1000, 50         # samples for each ELBO of the gap (common random numbers)
Z2_HIDDEN, Z2_EPOCHS, Z2_N_TRAIN = (200,), 8, 20000
QUICK_Z2_EPOCHS, QUICK_Z2_N_TRAIN = 1, 1000
N_DIGITS, GRID_N, QUICK_GRID_N, PANEL_N = 4, 301, 81, 120
MASS_LEVELS = (0.5, 0.9)
SEED = 0
COLOURS = {"amortized": "tab:blue", "per-datapoint": "tab:green", "semi-amortized": "tab:red"}


def train_in_turns(trainers, budget):
    """Train each for `budget` training seconds, one epoch at a time, the least-trained first.

    Returns {method: [(epoch, training seconds so far, theta steps so far, flat parameters)]}.
    """
    snapshots = {m: [] for m in trainers}
    steps_per_epoch = {m: -(-t.x_train.shape[0] // t.config.batch_size) for m, t in trainers.items()}
    spent = {m: 0.0 for m in trainers}
    while True:
        todo = [m for m in trainers if spent[m] < budget]
        if not todo:
            return snapshots
        m = min(todo, key=spent.get)
        t = trainers[m]
        t.run(until=t.epoch + 1)
        spent[m] = float(np.sum(t.history["seconds"]))
        snapshots[m].append((t.epoch, spent[m], t.epoch * steps_per_epoch[m], t.model.flat_params.copy()))


def score(model, method, epoch, x, k, rng):
    """The run's own q for x (theta fixed) and log p(x) by importance sampling from it (mean over x)."""
    q = inference.fit_q(model, x, method, INNER_STEPS.get(method), INNER_LR.get(method), rng, passes=max(1, epoch))
    log_px = evaluate.log_likelihood(model, x, k=k, rng=rng, q=q)
    return q, log_px


def pick(snapshots, n):
    """About n snapshots spread evenly over the run, and the last."""
    idx = np.unique(np.round(np.linspace(0, len(snapshots) - 1, n)).astype(int))
    return [snapshots[i] for i in idx]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny subset and budget (~20 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "inference")
    parser.add_argument("--data-dir", help="folder with the datasets (default $NPVAE_DATA, ~/.npvae/data)")
    args = parser.parse_args()
    q_ = args.quick
    budget = QUICK_BUDGET if q_ else BUDGET
    n_test, k_final = (QUICK_N_TEST, QUICK_K_FINAL) if q_ else (N_TEST, K_FINAL)
    n_curve, k_curve = (QUICK_N_CURVE, QUICK_K_CURVE) if q_ else (N_CURVE, K_CURVE)
    n_gap, gap_steps, n_eval = (QUICK_N_GAP, QUICK_GAP_STEPS, QUICK_N_EVAL) if q_ else (N_GAP, GAP_STEPS, N_EVAL)
    start = time.perf_counter()
    dataset = datasets.name_or_fallback(DATASET, FALLBACK, args.data_dir)

    # --- the three runs, on one clock -------------------------------------------------------------
    trainers = {}
    for m in METHODS:
        inner = {} if m == "amortized" else dict(inner_steps=INNER_STEPS[m], inner_lr=INNER_LR[m])
        config = TrainConfig(dataset=dataset, data_dir=args.data_dir, epochs=10 ** 6, batch_size=BATCH,
                             hidden=HIDDEN, z_dim=Z_DIM, activation=ACTIVATION, lr=LR,
                             n_valid=QUICK_N_VALID if q_ else N_VALID,
                             n_train=QUICK_N_TRAIN if q_ else None, seed=SEED, inference=m, **inner)
        # the reference engine for all three, so that the clock compares algorithms, not code
        trainers[m] = Trainer(config, args.out / "runs" / m, quiet=True, engine="reference")
    print(f"{dataset}: {trainers['amortized'].x_train.shape[0]} training images, 784-{'-'.join(map(str, HIDDEN))}-"
          f"{Z_DIM} {ACTIVATION}, batch {BATCH}; {budget:.0f} s of training each, in turns of one epoch")
    t0 = time.perf_counter()
    snapshots = train_in_turns(trainers, budget)
    train_wall = time.perf_counter() - t0
    for m, t in trainers.items():
        print(f"  {m:15s} {t.epoch:4d} epochs, {snapshots[m][-1][2]:6d} theta steps, "
              f"{np.median(t.history['seconds']):.2f} s per epoch, train ELBO {t.history['train_elbo'][-1]:.2f}")

    # --- scoring the kept parameters -----------------------------------------------------------------
    model = trainers["amortized"].model   # every run has the same architecture: load each snapshot into one
    x_all = test_set(trainers["amortized"].config, model, args.data_dir)
    x_test = x_all[np.arange(n_test) * (len(x_all) // n_test)]
    x_curve, x_gap = x_test[:n_curve], x_test[:n_gap]
    t1 = time.perf_counter()
    curves, final = {}, {}
    for m in METHODS:
        curves[m] = []
        for epoch, seconds, steps, flat in pick(snapshots[m], CURVE_POINTS):
            model.flat_params[...] = flat
            _, log_px = score(model, m, epoch, x_curve, k_curve, np.random.default_rng([SEED, epoch]))
            curves[m].append((seconds, steps, float(log_px.mean())))
        epoch, seconds, steps, flat = snapshots[m][-1]
        model.flat_params[...] = flat
        q, log_px = score(model, m, epoch, x_test, k_final, np.random.default_rng([SEED, 11]))
        stats = inference.elbo_stats_at(model, x_test, q, np.random.default_rng([SEED, 12]))
        gap = inference.amortization_gap(model, x_gap, (q[0][:n_gap], q[1][:n_gap]), np.random.default_rng([SEED, 13]),
                                         steps=gap_steps, n_eval=n_eval)
        history = trainers[m].history
        final[m] = dict(epochs=epoch, theta_steps=steps, train_seconds=seconds,
                        seconds_per_epoch=float(np.median(history["seconds"])),
                        train_elbo=history["train_elbo"][-1], test_elbo=stats["elbo"],
                        test_log_px=float(log_px.mean()), test_log_px_sem=float(log_px.std() / np.sqrt(len(log_px))),
                        gap=float(gap["gap"].mean()), train_elbo_per_epoch=history["train_elbo"])
        if m == "semi-amortized":
            enc = inference.amortization_gap(model, x_gap, model.encode(x_gap), np.random.default_rng([SEED, 13]),
                                             steps=gap_steps, n_eval=n_eval)
            final[m]["encoder_gap"] = float(enc["gap"].mean())
    # the amortized run at the others' numbers of theta steps (the same epoch)
    equal = {}
    for m in ("per-datapoint", "semi-amortized"):
        e = min(final[m]["epochs"], final["amortized"]["epochs"])
        model.flat_params[...] = snapshots["amortized"][e - 1][3]
        gap = inference.amortization_gap(model, x_gap, model.encode(x_gap), np.random.default_rng([SEED, 13]),
                                         steps=gap_steps, n_eval=n_eval)
        equal[m] = dict(epoch=e, theta_steps=snapshots["amortized"][e - 1][2],
                        amortized_gap=float(gap["gap"].mean()),
                        amortized_train_elbo=trainers["amortized"].history["train_elbo"][e - 1],
                        own_train_elbo=trainers[m].history["train_elbo"][e - 1],
                        own_gap=final[m]["gap"] if e == final[m]["epochs"] else None)
    score_seconds = time.perf_counter() - t1

    print(f"\nfinal figures on {n_test} test images (log p(x): K = {k_final}, from each run's own q; "
          f"gap on {n_gap} images), nats; scoring took {score_seconds:.0f} s")
    print(f"  {'method':15s} {'log p(x)':>14s} {'test ELBO':>9s} {'gap':>6s} {'train ELBO':>10s} "
          f"{'s/epoch':>7s} {'theta steps':>11s}")
    for m, f in final.items():
        print(f"  {m:15s} {f['test_log_px']:8.2f} ± {f['test_log_px_sem']:.2f} {f['test_elbo']:9.2f} {f['gap']:6.2f} "
              f"{f['train_elbo']:10.2f} {f['seconds_per_epoch']:7.2f} {f['theta_steps']:11d}")
    s = final["semi-amortized"]
    print(f"  semi-amortized: its encoder's q alone has gap {s['encoder_gap']:.2f}")
    for m, e in equal.items():
        print(f"at {e['theta_steps']} theta steps (epoch {e['epoch']}): amortized gap {e['amortized_gap']:.2f}, "
              f"train ELBO {e['amortized_train_elbo']:.2f}; {m} train ELBO {e['own_train_elbo']:.2f}"
              + ("" if e["own_gap"] is None else f", gap {e['own_gap']:.2f}"
                 f" ({100 * (1 - e['own_gap'] / e['amortized_gap']):.0f}% smaller)" if m == "semi-amortized" else ""))

    # --- a Z = 2 model: the encoder's q, the refined q and the exact posterior ---------------------------
    config = TrainConfig(dataset=dataset, data_dir=args.data_dir, epochs=QUICK_Z2_EPOCHS if q_ else Z2_EPOCHS,
                         batch_size=BATCH, hidden=Z2_HIDDEN, z_dim=2, activation=ACTIVATION, lr=LR,
                         n_valid=QUICK_N_VALID if q_ else N_VALID,
                         n_train=QUICK_Z2_N_TRAIN if q_ else Z2_N_TRAIN, seed=SEED, inference="semi-amortized",
                         inner_steps=INNER_STEPS["semi-amortized"], inner_lr=INNER_LR["semi-amortized"])
    z2 = Trainer(config, args.out / "runs" / "z2", quiet=True)
    z2.run()
    m2 = z2.model
    x2 = test_set(config, m2, args.data_dir)
    x2 = x2[np.arange(N_DIGITS) * (len(x2) // N_DIGITS) + 7]
    grid = evaluate.latent_grid(2, QUICK_GRID_N if q_ else GRID_N)
    log_px2 = evaluate.exact_log_likelihood(m2, x2, grid)
    q_enc = m2.encode(x2)
    q_ref = inference.fit_q(m2, x2, "semi-amortized", INNER_STEPS["semi-amortized"], INNER_LR["semi-amortized"], np.random.default_rng([SEED, 21]))
    optimize = evaluate.optimize_local(m2, x2, steps=gap_steps, rng=np.random.default_rng([SEED, 22]),
                                                n_eval=None, q=q_enc)
    q_star = (optimize["mu"], optimize["log_sigma"])
    elbos = {name: evaluate.elbo_estimate(m2, x2, q, n_eval, np.random.default_rng([SEED, 23]))
             for name, q in (("encoder", q_enc), ("refined", q_ref), ("optimized", q_star))}

    # --- figures ----------------------------------------------------------------------------------------
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    ax = axes[0]
    for m in METHODS:
        c = np.array(curves[m])
        ax.plot(c[:, 0], c[:, 2], "o-", color=COLOURS[m], label=f"{m} ({final[m]['theta_steps']} theta steps)")
    ax.set_xlabel("training time (s, one core)")
    ax.set_ylabel(f"test log p(x), K = {k_curve}, {n_curve} images (nats)")
    ax.set_title("log p(x) against wall time, equal budgets")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for m in METHODS:
        h = trainers[m].history["train_elbo"]
        ax.plot(np.arange(1, len(h) + 1) * snapshots[m][0][2], h, color=COLOURS[m], label=m)
    lo = min(min(trainers[m].history["train_elbo"][len(trainers[m].history["train_elbo"]) // 4:]) for m in METHODS)
    hi = max(max(trainers[m].history["train_elbo"]) for m in METHODS)
    ax.set_ylim(lo - 0.2 * (hi - lo + 1), hi + 0.1 * (hi - lo + 1))
    ax.set_xlabel("theta steps")
    ax.set_ylabel("training ELBO at the q theta stepped at (nats)")
    ax.set_title("training ELBO against theta steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[2]
    names = ["amortized\n(encoder)", "semi-amortized\n(refined)", "semi-amortized\n(its encoder)", "per-datapoint\n(inner loop)"]
    values = [final["amortized"]["gap"], s["gap"], s["encoder_gap"], final["per-datapoint"]["gap"]]
    bars = ax.bar(names, values, color=[COLOURS["amortized"], COLOURS["semi-amortized"], "salmon",
                                        COLOURS["per-datapoint"]])
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(f"ELBO(q*) - ELBO(own q), {n_gap} test images (nats)")
    ax.set_title("amortization gap of each method's own q, at the end")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{dataset}, 784-{'-'.join(map(str, HIDDEN))}-{Z_DIM} {ACTIVATION}: three ways to infer q, "
                 f"{budget:.0f} s of training each")
    paths = [plots.save_figure(fig, args.out / "inference.png")]

    fig, axes = plt.subplots(1, N_DIGITS, figsize=(3.4 * N_DIGITS, 3.8), layout="constrained")
    for j, ax in enumerate(np.atleast_1d(axes)):
        coarse_axes, log_post = evaluate.exact_posterior(m2, x2[j], grid)
        mus = [q[0][j].astype(np.float64) for q in (q_enc, q_ref, q_star)]
        sig = [dist.std(q[1][j].astype(np.float64)) for q in (q_enc, q_ref, q_star)]
        zz1, zz2 = np.meshgrid(*coarse_axes, indexing="ij")
        inside = log_post > log_post.max() + np.log(1e-3)
        lo = np.minimum([zz1[inside].min(), zz2[inside].min()], np.min([mu - 3 * sg for mu, sg in zip(mus, sig)], 0))
        hi = np.maximum([zz1[inside].max(), zz2[inside].max()], np.max([mu + 3 * sg for mu, sg in zip(mus, sig)], 0))
        centre, half = (lo + hi) / 2, 0.6 * np.max(hi - lo)
        zz1, zz2, z = plots.grid_2d((centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half), PANEL_N)
        out = m2.decode(z.astype(m2.dtype))
        log_p = (m2.log_px_z(np.broadcast_to(x2[j], (z.shape[0], x2.shape[1])), out).astype(np.float64)
                 + dist.standard_normal_log_prob(z) - log_px2[j]).reshape(zz1.shape)
        ax.contourf(zz1, zz2, np.exp(log_p), levels=plots_levels(log_p), cmap="Blues", alpha=0.9)
        for (mu, sg), colour, style in zip(zip(mus, sig), ("crimson", "darkgreen", "black"), ("-", "-", ":")):
            log_q = dist.gaussian_log_prob(z, mu, np.log(sg)).reshape(zz1.shape)
            ax.contour(zz1, zz2, np.exp(log_q), levels=plots_levels(log_q), colors=colour, linewidths=1.2,
                       linestyles=style)
        ax.set_aspect("equal")
        ax.set_title(f"log p(x) {log_px2[j]:.1f}; ELBO: encoder {elbos['encoder'][j]:.1f},\n"
                     f"refined {elbos['refined'][j]:.1f}, optimized {elbos['optimized'][j]:.1f}", fontsize=8)
        inset = ax.inset_axes([0.0, 0.72, 0.28, 0.28])
        inset.imshow(x2[j].reshape(28, 28) if x2.shape[1] == 784 else x2[j].reshape(z2.data.image_shape),
                     cmap="gray_r", interpolation="nearest")
        inset.set_xticks([])
        inset.set_yticks([])
    ax0 = np.atleast_1d(axes)[0]
    ax0.plot([], [], color="steelblue", lw=6, label="p(z|x), exact")
    ax0.plot([], [], color="crimson", label="encoder's q")
    ax0.plot([], [], color="darkgreen", label=f"refined q ({INNER_STEPS['semi-amortized']} steps)")
    ax0.plot([], [], color="black", ls=":", label=f"q* ({gap_steps} steps)")
    ax0.legend(loc="lower right", fontsize=7, framealpha=0.8)
    fig.suptitle(f"{dataset}, Z = 2, semi-amortized {Z2_HIDDEN} {ACTIVATION}: the encoder's q, the refined q and "
                 f"the exact posterior; contours at {', '.join(f'{v:.0%}' for v in MASS_LEVELS)} of the mass")
    paths.append(plots.save_figure(fig, args.out / "inference_posterior.png"))

    results = dict(dataset=dataset, budget_seconds=budget, train_wall_seconds=train_wall, score_seconds=score_seconds,
                   inner_steps=INNER_STEPS, inner_lr=INNER_LR, final=final, equal_theta_steps=equal,
                   curves={m: [dict(seconds=a, theta_steps=b, log_px=c) for a, b, c in v] for m, v in curves.items()},
                   z2={"log_px": log_px2.tolist(), **{k: v.tolist() for k, v in elbos.items()}})
    (args.out / "inference.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\nZ = 2, exact log p(x) and the ELBO of each q per digit:")
    for j in range(N_DIGITS):
        print(f"  {log_px2[j]:8.2f}  encoder {elbos['encoder'][j]:8.2f}  refined {elbos['refined'][j]:8.2f}  "
              f"optimized {elbos['optimized'][j]:8.2f}")
    print("\nwrote", *paths, args.out / "inference.json", sep="\n  ")
    print(f"done in {time.perf_counter() - start:.1f} s")


def plots_levels(log_density):
    """Increasing density values whose upper level sets hold MASS_LEVELS of a gridded density's mass, and its max."""
    p = np.sort(np.exp(log_density).ravel())[::-1]
    cumulative = np.cumsum(p) / p.sum()
    levels = sorted({float(p[min(np.searchsorted(cumulative, v), p.size - 1)]) for v in MASS_LEVELS})
    return levels + [float(p[0]) * 1.0001] if levels[-1] < p[0] else levels


if __name__ == "__main__":
    main()
