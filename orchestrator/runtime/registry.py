"""Resolves the classes that the floor's tables (`orchestrator/core/algorithms.py`) name by import path."""

from __future__ import annotations

import importlib

from orchestrator.core.algorithms import ALGORITHMS, ROLLOUT_BACKENDS


def resolve(path: str) -> type:
    """`package.module:Class` -> the class, imported on first use (optional extras stay optional)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def driver_class(algorithm: str) -> type:
    return resolve(ALGORITHMS[algorithm].driver)


def trainer_class(algorithm: str) -> type:
    return resolve(ALGORITHMS[algorithm].trainer)


def rollout_class(backend: str) -> type:
    return resolve(ROLLOUT_BACKENDS[backend])
