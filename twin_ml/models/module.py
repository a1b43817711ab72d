"""The LightningModule that trains any surrogate (all ensemble members at once)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from twin_ml.models.surrogates import Surrogate


class SurrogateModule(L.LightningModule):
    """Trains `model` on trajectory windows with a horizon curriculum (multiple shooting).

    The window starts at `curriculum_start` steps and doubles every `curriculum_every` epochs up
    to the full horizon (or `max_horizon`). Each trajectory is cut into consecutive windows of
    that length (shooting segments, each started from the data's state at its first step), so
    every epoch uses all the data whatever the window; the segments' offset is drawn from a
    generator keyed by (seed, epoch, batch), so a resumed run sees the same windows. Loss per
    member: MSE of the normalized states (ODE models) or outputs (emulator), plus the Gaussian NLL
    of the outputs under the member's learned variance; members are summed, so each gets its own
    gradient. `bootstrap` weights each member's scenarios with Poisson(1) counts (bagging).
    """

    def __init__(
        self,
        model: Surrogate,
        *,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        nll_weight: float = 0.1,
        curriculum_start: int = 10,
        curriculum_every: int = 5,
        max_horizon: int | None = None,
        scheduler: str = "cosine",
        bootstrap: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if scheduler not in ("cosine", "none"):
            raise ValueError(f"module.scheduler must be 'cosine' or 'none', got {scheduler!r}")
        if curriculum_start < 1 or curriculum_every < 1:
            raise ValueError("module.curriculum_start and curriculum_every must be >= 1")
        if max_horizon is not None and max_horizon < 1:
            raise ValueError(f"module.max_horizon must be >= 1 (steps) or null, got {max_horizon}")
        self.model = model
        self.save_hyperparameters(
            ignore=["model"]
        )  # plain numbers and strings only: weights_only-safe

    # ---- helpers -----------------------------------------------------------------------------
    def window(self, n_t: int) -> int:
        """Training window length in steps for the current epoch."""
        hp = self.hparams
        full = n_t - 1 if hp.max_horizon is None else min(hp.max_horizon, n_t - 1)
        if self.model.kind == "emulator":
            return n_t - 1
        return min(full, hp.curriculum_start * 2 ** (self.current_epoch // hp.curriculum_every))

    def _t(self) -> torch.Tensor:
        return self.trainer.datamodule.t.to(self.device)

    @staticmethod
    def segments(batch, offset: int, steps: int):
        """Cut each trajectory into consecutive windows of `steps` steps from `offset`:
        the batch's scenarios become B*K windows (K per scenario), with the relative time grid."""
        index, x0, u, p, x, y = batch
        n_t = x.shape[1]
        starts = torch.arange(offset, n_t - steps, steps, device=x.device)  # [K]
        idx = starts[:, None] + torch.arange(steps + 1, device=x.device)  # [K, steps+1]
        k = len(starts)

        def cut(a):  # [B, T, d] -> [B*K, steps+1, d]
            return a[:, idx].reshape(a.shape[0] * k, steps + 1, a.shape[-1])

        xw = cut(x)
        return (
            index.repeat_interleave(k),
            xw[:, 0],
            cut(u),
            p.repeat_interleave(k, dim=0),
            xw,
            cut(y),
        )

    @staticmethod
    def latent_segments(model, batch, offset: int, steps: int):
        """A reduced-order model's windows: they start at snapshot times (where the field, hence
        the latent state, is known), every `offset`-th snapshot on; the latent targets are the
        projected snapshots inside each window. Returns (index, z0, u, p, y, z_target, at) with
        `at` the window positions of those targets."""
        index, x0, u, p, xs, y = batch
        stride, n_t = model.snapshot_stride, y.shape[1]
        z = model.encode_field(xs)  # [B, Ts, r]
        last = (n_t - 1 - steps) // stride  # the last snapshot a whole window fits after
        first = offset % (last + 1) if last > 0 else 0
        starts = torch.arange(first, max(last, 0) + 1, max(1, steps // stride))
        if len(starts) == 0:
            starts = torch.zeros(1, dtype=torch.long)
        k = len(starts)
        idx = starts[:, None] * stride + torch.arange(steps + 1)  # [K, steps+1]
        at = torch.arange(0, steps + 1, stride)
        z_idx = starts[:, None] + torch.arange(len(at))

        def cut(a, ix):
            return a[:, ix].reshape(a.shape[0] * k, ix.shape[1], a.shape[-1])

        return (
            index.repeat_interleave(k),
            z[:, starts].reshape(-1, z.shape[-1]),
            cut(u, idx),
            p.repeat_interleave(k, dim=0),
            cut(y, idx),
            cut(z, z_idx),
            at,
        )

    def _loss(self, batch, offset: int, steps: int) -> torch.Tensor:
        m = self.model
        t = self._t()
        if m.kind in ("latent", "rom"):
            index, z0, u, p, y, zt, at = self.latent_segments(m, batch, offset, steps)
            zm, ym = m(z0.unsqueeze(0).expand(m.members, -1, -1), u, p, t[: steps + 1] - t[0])
            fit = ((zm[:, :, at] - zt) / m.z_std) ** 2  # [M, B*K, snapshots, r]
            y_fit = ((ym - y) / m.y_std) ** 2
            fit = torch.cat([fit.flatten(2), y_fit.flatten(2)], dim=2)[..., None]
        elif m.kind == "emulator":
            index, x0, u, p, x, y = batch
            _, ym = m(x0, u, p, t)
            fit = ((ym - y) / m.y_std) ** 2  # [M, B, T, ny]
        else:
            index, x0, u, p, x, y = self.segments(batch, offset, steps)
            xm, ym = m(
                x0, u, p, t[: steps + 1] - t[0]
            )  # the grid is uniform (checked by the datamodule)
            fit = ((xm - x) / m.x_std) ** 2  # [M, B*K, steps+1, nx]
        yn, ymn = (y - m.y_mean) / m.y_std, (ym - m.y_mean) / m.y_std
        lv = m.logvar[:, None, None, :]
        nll = 0.5 * (lv + (yn - ymn) ** 2 / torch.exp(lv))
        per = fit.mean(dim=(2, 3)) + self.hparams.nll_weight * nll.mean(dim=(2, 3))  # [M, B]
        if self.hparams.bootstrap and m.members > 1:
            w = self._bootstrap_weights(index)
            return (per * w).sum(dim=1).div(w.sum(dim=1).clamp_min(1.0)).sum()
        return per.mean(dim=1).sum()

    def _bootstrap_weights(self, index: torch.Tensor) -> torch.Tensor:
        """Poisson(1) count of each scenario for each member, fixed by (seed, member, scenario):
        one generator per member, drawn in scenario order, so a count never depends on the batch."""
        n = int(index.max()) + 1
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            n = max(n, int(dm.splits["train"]["index"].max()) + 1)
        rows = [
            torch.poisson(torch.ones(n), generator=_member_generator(self.hparams.seed, m))
            for m in range(self.model.members)
        ]
        return torch.stack(rows)[:, index.cpu()].to(self.device)

    # ---- lightning ---------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        n_t = self._t().shape[0]
        steps = self.window(n_t)
        g = torch.Generator().manual_seed(
            (self.hparams.seed * 1009 + self.current_epoch) * 100_003 + batch_idx
        )
        offset = int(torch.randint(0, min(steps, n_t - steps), (1,), generator=g))
        loss = self._loss(batch, offset, steps)
        self.log(
            "train/loss", loss, prog_bar=True, batch_size=batch[0].shape[0], sync_dist=True
        )  # DDP: the mean over the processes' shares
        self.log("train/window", float(steps), batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        index, x0, u, p, x, y = batch
        pred = self.model.predict(x0, u, p, self._t())
        mean = pred["mean"]
        err = ((mean - y) / self.model.y_std) ** 2
        rel = torch.linalg.vector_norm((mean - y).flatten(1), dim=1) / torch.linalg.vector_norm(
            y.flatten(1), dim=1
        ).clamp_min(1e-12)
        self.log("val/loss", err.mean(), prog_bar=True, batch_size=x0.shape[0])
        self.log("val/rel_l2_median", rel.median(), batch_size=x0.shape[0])

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW's parameter groups (a subclass adds its own, e.g. with another learning rate)."""
        return [
            {
                "params": list(self.parameters()),
                "lr": self.hparams.lr,
                "weight_decay": self.hparams.weight_decay,
            }
        ]

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.param_groups())
        if self.hparams.scheduler == "none":
            return opt
        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max_epochs, eta_min=self.hparams.lr * 0.02
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["twin_model_config"] = (
            self.model.config
        )  # JSON-plain: rebuilds the model without code paths


def _member_generator(seed: int, member: int) -> torch.Generator:
    """The generator of a member's bootstrap counts (scenarios or blocks), fixed by (seed,
    member)."""
    return torch.Generator().manual_seed(seed * 7919 + 17 + member)


class TelemetryModule(SurrogateModule):
    """Trains an ODE surrogate on measured records, where only the outputs are observed (and some
    of them masked), by multiple shooting with estimated states.

    Every record r of T steps gets a table of states s[m, r, k] per member (a parameter, held in
    the model's normalized state units so that `state_lr` means the same for every state; started
    from `init_states` [R, T, nx], e.g. the physics simulated along the record with the measured
    outputs in place). Each step cuts every record into consecutive windows of `window` steps from a
    random offset; member m rolls each window out from s[m, r, start]. Loss per member: the MSE of
    the observed outputs (normalized, masked points excluded), plus `consistency` x the MSE between
    a window's end state and the table's state there (normalized), plus the outputs' Gaussian NLL.
    The table learns the unobserved states; the consistency term ties the windows into one
    trajectory, so the model learns long-horizon behaviour from short, parallel windows.

    Long records: `windows_per_step` rolls out a random subset of the windows per step (None: all),
    and `val_steps` limits the validation free run to each record's first steps (None: all).
    `bootstrap` (block bagging): each member weights the record's blocks of `window` samples by
    Poisson(1) counts fixed by (seed, member), so the members see different resamplings of one
    record and disagree where the data do not pin the model down.
    """

    def __init__(
        self,
        model,
        *,
        init_states,
        window: int = 32,
        consistency: float = 1.0,
        state_lr: float = 1e-2,
        iterations_per_epoch: int = 50,
        windows_per_step: int | None = None,
        val_steps: int | None = None,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        init = torch.as_tensor(init_states, dtype=torch.float32)
        if init.dim() != 3 or init.shape[-1] != model.nx:
            raise ValueError(
                f"init_states must be [records, T, {model.nx}], got {tuple(init.shape)}"
            )
        if window < 1 or window >= init.shape[1] - 1:
            raise ValueError(
                f"telemetry.window must be in [1, {init.shape[1] - 2}] steps, got {window}"
            )
        for name, v in (("windows_per_step", windows_per_step), ("val_steps", val_steps)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"telemetry.{name} must be a positive integer or null, got {v!r}")
        norm = (init - model.x_mean) / model.x_std
        self.states = torch.nn.Parameter(
            norm.unsqueeze(0).repeat(model.members, 1, 1, 1)
        )  # [M, R, T, nx]
        for hp in (
            self._hparams,
            self._hparams_initial,
        ):  # the table is a parameter, not a hyperparameter
            hp.pop("init_states", None)
        self.hparams.update(
            window=window,
            consistency=consistency,
            state_lr=state_lr,
            iterations_per_epoch=iterations_per_epoch,
            windows_per_step=windows_per_step,
            val_steps=val_steps,
        )
        r, n_t = init.shape[0], init.shape[1]
        weights = torch.ones(model.members, r, n_t)
        if self.hparams.bootstrap and model.members > 1:
            n_blocks = -(-n_t // window)
            for m in range(model.members):
                counts = torch.poisson(
                    torch.ones(r, n_blocks), generator=_member_generator(self.hparams.seed, m)
                )
                weights[m] = counts.repeat_interleave(window, dim=1)[:, :n_t]
        self.register_buffer("sample_weights", weights, persistent=False)  # [M, R, T]

    @property
    def table(self) -> torch.Tensor:
        """The state table [M, R, T, nx] in the states' own units."""
        return self.states * self.model.x_std + self.model.x_mean

    def _windows(self, offset: int, steps: int, n_t: int, generator: torch.Generator | None = None):
        starts = torch.arange(offset, n_t - steps, steps)
        keep = self.hparams.get("windows_per_step")
        if keep is not None and len(starts) > keep:
            starts = starts[torch.randperm(len(starts), generator=generator)[:keep].sort().values]
        starts = starts.to(self.states.device)
        return starts, starts[:, None] + torch.arange(steps + 1, device=self.states.device)

    def record_loss(
        self, batch, offset: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        m = self.model
        u, p, y, mask = (
            batch["u"],
            batch["p"],
            batch["y"],
            batch["mask"],
        )  # [R,T,nu] [R,np] [R,T,ny] [R,T,ny]
        r, n_t = y.shape[0], y.shape[1]
        steps = self.hparams.window
        starts, idx = self._windows(offset, steps, n_t, generator)
        k = len(starts)
        table = self.table
        x0 = table[:, :, starts].reshape(m.members, r * k, m.nx)  # [M, R*K, nx]
        uw = u[:, idx].reshape(r * k, steps + 1, -1)
        pw = p.repeat_interleave(k, dim=0)
        xm, ym = m(x0, uw, pw, self._t()[: steps + 1] - self._t()[0])  # [M, R*K, W+1, .]
        yw = y[:, idx].reshape(r * k, steps + 1, -1)
        ok = mask[:, idx].reshape(r * k, steps + 1, -1).to(ym.dtype)
        yn, ymn = (yw - m.y_mean) / m.y_std, (ym - m.y_mean) / m.y_std
        err2 = torch.where(ok.bool(), (yn - ymn) ** 2, torch.zeros_like(ymn))
        wts = (
            self.sample_weights[:, :, idx].reshape(m.members, r * k, steps + 1, 1) * ok
        )  # [M, R*K, W+1, ny]
        n_ok = wts.sum(dim=(1, 2, 3)).clamp_min(1.0)  # [M]
        fit = (err2 * wts).sum(dim=(1, 2, 3)) / n_ok  # [M]
        lv = m.logvar[:, None, None, :]
        nll = (0.5 * (lv + err2 / torch.exp(lv)) * wts).sum(dim=(1, 2, 3)) / n_ok
        end = table[:, :, starts + steps].reshape(m.members, r * k, m.nx)
        cons = (((xm[:, :, -1] - end) / m.x_std) ** 2).mean(dim=(1, 2))
        self.log("train/fit", fit.mean(), batch_size=r)
        self.log("train/consistency", cons.mean(), batch_size=r)
        return (fit + self.hparams.consistency * cons + self.hparams.nll_weight * nll).sum()

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(
            (self.hparams.seed * 1009 + self.current_epoch) * 100_003 + batch_idx
        )
        n_t, w = batch["y"].shape[1], self.hparams.window
        offset = int(
            torch.randint(0, max(1, min(w, n_t - w)), (1,), generator=g)
        )  # at least one window
        loss = self.record_loss(batch, offset, g)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["y"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        """RMSE of the ensemble mean's free run over each record (its first `val_steps`), from the
        table's first state."""
        m = self.model
        n = (
            batch["u"].shape[1]
            if self.hparams.get("val_steps") is None
            else min(self.hparams.val_steps, batch["u"].shape[1])
        )
        batch = {k: v[:, :n] if v.dim() > 2 else v for k, v in batch.items()}
        x0 = self.table[:, :, 0]  # [M, R, nx]
        _, ym = m(x0, batch["u"], batch["p"], self._t()[:n])
        ok = batch["mask"].bool()
        err = torch.where(ok, ym.mean(dim=0) - batch["y"], torch.zeros_like(batch["y"]))
        rmse = torch.sqrt((err**2).sum() / ok.sum().clamp_min(1))
        self.log("val/loss", rmse, prog_bar=True, batch_size=batch["y"].shape[0])

    def param_groups(self) -> list[dict[str, Any]]:
        return [
            {
                "params": [p for n, p in self.named_parameters() if not n.startswith("states")],
                "lr": self.hparams.lr,
                "weight_decay": self.hparams.weight_decay,
            },
            {"params": [self.states], "lr": self.hparams.state_lr, "weight_decay": 0.0},
        ]
