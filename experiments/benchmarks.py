"""Fast pure-Python sessions with known optima, for tests and benchmarks.

Each takes an optional static ``sleep_s`` that simulates an expensive training run.
"""

from __future__ import annotations

import math
import time
from typing import Any

BRANIN_OPTIMUM = 0.397887
HARTMANN6_OPTIMUM = -3.32237

_A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14],
      [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]  # fmt: skip
_P = [[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
      [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]]  # fmt: skip
_ALPHA = [1.0, 1.2, 3.0, 3.2]


def branin(cfg: dict[str, Any]) -> float:
    """Branin on x1 in [-5, 10], x2 in [0, 15]; minimum 0.397887."""
    _sleep(cfg)
    x1, x2 = cfg["x1"], cfg["x2"]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


def hartmann6(cfg: dict[str, Any]) -> float:
    """Hartmann-6 on [0, 1]^6 (keys x1..x6); minimum -3.32237."""
    _sleep(cfg)
    x = [cfg[f"x{i}"] for i in range(1, 7)]
    total = 0.0
    for a, p, alpha in zip(_A, _P, _ALPHA, strict=True):
        inner = sum(a[j] * (x[j] - p[j] * 1e-4) ** 2 for j in range(6))
        total -= alpha * math.exp(-inner)
    return total


def quadratic(cfg: dict[str, Any]) -> float:
    """(x - 2)^2: the trivial objective of the overhead benchmark."""
    _sleep(cfg)
    return float((cfg["x"] - 2) ** 2)


def _sleep(cfg: dict[str, Any]) -> None:
    if cfg.get("sleep_s"):
        time.sleep(cfg["sleep_s"])
