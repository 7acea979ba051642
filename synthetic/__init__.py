"""Synthetic M-BEIR-format data: the worlds the tiny and demo settings run on."""
