"""Pieces that belong to one paper only; they plug into the generic callbacks through config."""
