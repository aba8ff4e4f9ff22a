"""Checkpoint the random number generators so a resumed run continues the same random stream.

Lightning restores weights, optimizer, schedulers and callback state but not the RNGs; data
loaders and random criteria draw from them, so without this a resumed run drifts from an
uninterrupted one. States are stored as tensors and lists: they load with weights_only=True.
"""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class RNGState(L.Callback):
    def state_dict(self):
        np_state = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state):
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
