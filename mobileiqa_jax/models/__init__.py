"""Flax modules of MobileIQA: timm-exact backbones and the IQA head."""
