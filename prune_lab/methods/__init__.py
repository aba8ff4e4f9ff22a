"""Pieces that belong to one paper only; they plug into generic callbacks through config `_target_`."""
