"""Formats of other tools: SAELens export (`saelens.py`) and the Switch SAE as a SAELens architecture."""
