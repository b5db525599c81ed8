"""Example experiment: PyTorch linear (or one-hidden-layer) regression on synthetic data.

Everything about data, model and training lives here; the framework only passes ``cfg`` in
and takes the validation MSE out. ``report`` makes per-epoch pruning possible, ``trial().log``
keeps each epoch's losses (``hpo-inspect --trial N``, ``--metrics``, ``--plot``); ``checkpoint``
lets a retried trial carry on from its last epoch (with ``checkpoints:`` in config.yaml; without
it, save does nothing and load returns None).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hpo_framework import TrialPruned, checkpoint, report, trial


def make_data(
    n_samples: int, n_features: int, noise: float, seed: int
) -> tuple[torch.Tensor, ...]:
    """A fixed random linear problem: y = X w + b + noise, split 80/20."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, n_features, generator=g)
    w = torch.randn(n_features, 1, generator=g)
    y = x @ w + 0.5 + noise * torch.randn(n_samples, 1, generator=g)
    split = int(0.8 * n_samples)
    return x[:split], y[:split], x[split:], y[split:]


def build_model(n_features: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(n_features, 1)
    return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def single_session(cfg: dict[str, Any]) -> float:
    """Train with ``cfg``'s hyperparameters; return the validation mean squared error."""
    data = cfg["data"]
    torch.manual_seed(data.get("seed", 0))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x_train, y_train, x_val, y_val = (
        t.to(device)
        for t in make_data(data["n_samples"], data["n_features"], data["noise"], data["seed"])
    )
    model = build_model(data["n_features"], cfg.get("model", {}).get("hidden", 0)).to(device)
    if cfg["optimizer"] == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg["lr"], momentum=cfg.get("momentum", 0.0),
            weight_decay=cfg.get("weight_decay", 0.0),
        )  # fmt: skip
    else:
        opt = torch.optim.Adam(
            model.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0)
        )
    loss_fn = nn.MSELoss()
    batch_size = cfg["batch_size"]
    val_mse, first = float("inf"), 0
    saved = checkpoint.load()  # the state of an earlier attempt of this trial, if any
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        first, val_mse = saved["epoch"], saved["val_mse"]
    for epoch in range(first, cfg["epochs"]):
        model.train()
        order = torch.randperm(len(x_train), device=device)
        for start in range(0, len(x_train), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_mse = loss_fn(model(x_val), y_val).item()
        if not math.isfinite(val_mse):  # SGD with a large lr and momentum blows up: no score
            raise TrialPruned(f"diverged at epoch {epoch} (validation MSE {val_mse})")
        trial().log(step=epoch, val_mse=val_mse, train_loss=loss.item())  # every epoch kept
        checkpoint.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "rng": torch.get_rng_state(), "epoch": epoch + 1, "val_mse": val_mse}
        )  # fmt: skip
        report(val_mse, epoch)  # lets the pruner stop a hopeless trial early
    return val_mse


def untrained_mse(cfg: dict[str, Any]) -> float:
    """The validation MSE of predicting zero: the baseline any trained model must beat."""
    data = cfg["data"]
    _, _, _, y_val = make_data(data["n_samples"], data["n_features"], data["noise"], data["seed"])
    return float((y_val**2).mean())
