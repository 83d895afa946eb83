"""Evaluation: FID/KID on Inception or toy features, CLIP score, sweeps over step counts."""
