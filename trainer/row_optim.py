"""Optimizer steps of the head's class rows: exact lazy SGD, dense AdamW.

With class sampling a step gives gradients to a few rows only (a sparse COO
gradient, see ``head``), yet every row still moves: SGD's weight decay and
momentum act on rows without gradient too.  For such a row torch's SGD
(momentum ``mu``, weight decay ``wd``, learning rate ``lr``; no dampening, no
Nesterov) computes

    buf' = mu * buf + wd * w
    w'   = w - lr * buf' = (1 - lr * wd) * w - lr * mu * buf

the same linear map of ``(w, buf)`` for every such row, depending only on the
step's learning rate.  ``LazySGD`` therefore updates only the rows with a
gradient.  Every other row remembers the step it is up to date at, and each
such step keeps the running product of the 2x2 maps of the steps since
(float64); a row is brought up to date when it next gets a gradient, or by
``catch_up()`` (before a checkpoint is taken).  Mathematically this is the
dense update; numerically it rounds once per catch-up instead of once per step.
A catch-up rounds the rows, so a run that saved (caught up) at step N and a
run resumed from that save continue bit for bit alike.

AdamW has no such form: a row without gradient moves by
``m / (sqrt(v) + eps)`` with ``m`` and ``v`` decaying at different rates, a
function of each element's own ``(m, v)`` that does not compose into one map
(``eps``), so catching up would replay every skipped step.  ``DenseAdamW``
therefore steps every row every step, as torch's AdamW does.

Both also accept dense gradients (sample_rate 1), and ``LazySGD`` then updates
in place, with no weight-decayed copy of the gradient.
"""

from __future__ import annotations

import torch

from .scratch import Scratch

_CATCH_UP_ROWS = 8192  # rows per block when every row is caught up (bounds the temporary)


def _apply_(maps: torch.Tensor, weight: torch.Tensor, buf: torch.Tensor | None) -> None:
    """``(w, buf) <- map (w, buf)`` for each row, in place; ``maps`` is ``rows x 2 x 2``."""
    maps = maps.to(weight.dtype)[:, :, :, None]
    if buf is None:  # no momentum: the maps' second column is zero
        weight.mul_(maps[:, 0, 0])
        return
    old = weight.clone()
    weight.mul_(maps[:, 0, 0]).addcmul_(buf, maps[:, 0, 1])
    buf.mul_(maps[:, 1, 1]).addcmul_(old, maps[:, 1, 0])


class _Lag:
    """How far behind the rows of one matrix are: for each row the step it is up to date at, and
    for each such step the product of the maps of the steps since (the map its rows still owe)."""

    def __init__(self, num_rows: int, device: torch.device):
        self.step = 0
        self.since = torch.zeros(num_rows, dtype=torch.long, device=device)
        self.reset()

    def reset(self) -> None:
        """Every row is up to date."""
        device = self.since.device
        self.since.fill_(self.step)
        self.steps = torch.tensor([self.step], device=device)  # sorted, one per distinct value of ``since``
        self.maps = torch.eye(2, dtype=torch.float64, device=device)[None]
        self.counts = torch.tensor([len(self.since)], device=device)

    @property
    def current(self) -> bool:
        return len(self.steps) == 1 and int(self.steps[0]) == self.step

    def owed(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """``len(rows) x 2 x 2``: what brings each of ``rows`` up to date."""
        return self.maps[torch.searchsorted(self.steps, self.since[rows])]

    def advance(self, rows: torch.Tensor | None, skipped: torch.Tensor) -> None:
        """One step: ``rows`` (None: all) took it with their gradient, every other row the map ``skipped``."""
        if rows is None:
            self.step += 1
            self.reset()
            return
        self.counts -= torch.bincount(torch.searchsorted(self.steps, self.since[rows]), minlength=len(self.steps))
        self.maps = skipped @ self.maps
        self.step += 1
        self.since[rows] = self.step
        kept = self.counts > 0
        device = self.since.device
        self.steps = torch.cat([self.steps[kept], torch.tensor([self.step], device=device)])
        self.maps = torch.cat([self.maps[kept], torch.eye(2, dtype=torch.float64, device=device)[None]])
        self.counts = torch.cat([self.counts[kept], torch.tensor([len(rows)], device=device)])


def _rows_groups(optimizer: torch.optim.Optimizer):
    return (g for g in optimizer.param_groups if g.get("rows"))


class LazySGD(torch.optim.SGD):
    """torch's SGD, except that the parameters of groups with ``rows: True`` step row by row, lazily.

    Whatever reads such rows during training must read them through ``rows()``.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._lags: dict[torch.Tensor, _Lag] = {}
        self._scratch = Scratch()  # the gathered rows and their momentum
        if any(g["nesterov"] or g["dampening"] or g["maximize"] for g in _rows_groups(self)):
            raise ValueError("LazySGD steps rows without dampening, Nesterov momentum or maximize")
        # torch's own state_dict()/load_state_dict() see, and restore, up-to-date rows too
        self.register_state_dict_pre_hook(lambda optimizer: optimizer.catch_up())
        self.register_load_state_dict_post_hook(lambda optimizer: optimizer._lags.clear())

    @torch.no_grad()
    def rows(self, p: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """The up-to-date values of rows ``index`` of ``p`` (a copy), or ``p`` itself made up to date (None)."""
        if index is None:
            self._catch_up(p)
            return p
        rows = torch.index_select(p, 0, index, out=self._scratch("rows", len(index), p))
        lag = self._lags.get(p)
        if lag is not None and not lag.current:
            owed = lag.owed(index).to(p.dtype)[:, :, :, None]
            rows.mul_(owed[:, 0, 0])
            buf = self.state[p].get("momentum_buffer")
            if buf is not None:
                rows.addcmul_(self._gather(buf, index), owed[:, 0, 1])
        return rows

    def _gather(self, buf: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.index_select(buf, 0, index, out=self._scratch("buf_rows", len(index), buf))

    def step(self, closure=None):
        with torch.no_grad():
            for group in _rows_groups(self):
                for p in group["params"]:
                    if p.grad is not None:
                        self._step_rows(p, group)
                        p.grad = None  # consumed: torch's step below skips the parameter
        return super().step(closure)

    def _step_rows(self, p: torch.Tensor, group: dict) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        if mu and "momentum_buffer" not in self.state[p]:
            self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buf = self.state[p].get("momentum_buffer")
        lag = self._lags.setdefault(p, _Lag(len(p), p.device))
        skipped = torch.tensor([[1 - lr * wd, -lr * mu], [wd, mu]], dtype=torch.float64, device=p.device)
        if not p.grad.is_sparse:  # every row has a gradient: torch's SGD, in place
            self._catch_up(p)
            step = p.grad.add_(p, alpha=wd)
            if buf is not None:
                step = torch.add(step, buf, alpha=mu, out=buf)
            p.add_(step, alpha=-lr)
            lag.advance(None, skipped)
            return
        # The rows with a gradient catch up, (w', buf') = owed (w, buf), and take torch's step,
        # buf'' = mu buf' + wd w' + g = (skipped @ owed) (w, buf) + g and w'' = w' - lr buf'',
        # both at once, in place on the gathered rows.
        grad = p.grad.coalesce()  # sums rows that several micro-batches gave a gradient
        rows, grad = grad.indices()[0], grad.values()
        owed = lag.owed(rows)
        both = (skipped @ owed).to(p.dtype)[:, :, :, None]
        owed = owed.to(p.dtype)[:, :, :, None]
        weight = torch.index_select(p, 0, rows, out=self._scratch("rows", len(rows), p))  # the forward's are done
        if buf is None:
            weight.mul_(both[:, 0, 0]).add_(grad, alpha=-lr)
        else:
            rows_buf = self._gather(buf, rows)
            new_buf = grad.addcmul_(weight, both[:, 1, 0]).addcmul_(rows_buf, both[:, 1, 1])
            weight.mul_(owed[:, 0, 0]).addcmul_(rows_buf, owed[:, 0, 1]).add_(new_buf, alpha=-lr)
            buf.index_copy_(0, rows, new_buf)
        p.index_copy_(0, rows, weight)
        lag.advance(rows, skipped)

    @torch.no_grad()
    def _catch_up(self, p: torch.Tensor) -> None:
        lag = self._lags.get(p)
        if lag is None or lag.current:
            return
        buf = self.state[p].get("momentum_buffer")
        for start in range(0, len(p), _CATCH_UP_ROWS):
            block = slice(start, start + _CATCH_UP_ROWS)
            _apply_(lag.owed(block), p[block], None if buf is None else buf[block])
        lag.reset()

    def catch_up(self) -> None:
        """Bring every row (and its momentum) up to date: before anything reads them, e.g. a checkpoint."""
        for p in self._lags:
            self._catch_up(p)


class DenseAdamW(torch.optim.AdamW):
    """torch's AdamW; a sparse gradient of a ``rows`` group is made dense, every row steps (see the module doc)."""

    def step(self, closure=None):
        for group in _rows_groups(self):
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.to_dense()
        return super().step(closure)

    def catch_up(self) -> None:
        """Nothing is ever behind."""
