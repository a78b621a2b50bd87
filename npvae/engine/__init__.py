"""The engine: how npvae is made fast. Read after the rest.
"""
