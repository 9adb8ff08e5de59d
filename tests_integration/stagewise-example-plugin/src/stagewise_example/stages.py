"""Two stages: ``example.mine_hard`` finds the hard examples, ``example.train_hard`` trains on them.

They talk through one artifact, ``state.artifacts["example.hard_examples"]``: the mined split,
the indices of its hard examples and the router's state, all checkpointed with the run. The
mining stage also keeps its router (``state.keep_router``), so ``stagewise export`` writes it
beside the weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

import stagewise
from stagewise.engine.batches import batch_indices, epoch_order, to_device
from stagewise.specs import RouterSpec

if TYPE_CHECKING:
    from stagewise.data.splits import DataSplits
    from stagewise.recipe import Recipe

HARD_EXAMPLES = "example.hard_examples"  # the artifact key


@torch.no_grad()
def per_example_losses(model: torch.nn.Module, batches) -> torch.Tensor:
    """Mean cross-entropy of each example (N,), in the order the batches hold them."""
    losses = []
    with stagewise.eval_mode(model):  # no dropout; the model's training mode comes back afterwards
        for batch in batches:
            logits, target = stagewise.forward_batch(model, batch, stagewise.Needs())["logits"], batch["target"]
            nll = F.cross_entropy(logits.flatten(0, -2), target.flatten().long(), reduction="none")
            losses.append(nll.view(len(target), -1).mean(1))  # (B,): mean over tokens, if any
    return torch.cat(losses)


@dataclass
class MineHardOptions:
    router: RouterSpec  # e.g. { use = "example.loss_quantile", hard_ratio = 0.25 }
    split: str = "train"  # the split scored, calibrated on and mined; keep it out of evaluation


class MineHard(stagewise.Stage):
    """Score every example of ``split`` by its loss, calibrate the router on those losses and
    keep the examples it routes to ``"hard"``. Trains nothing. Reports ``<stage>/<what the
    router calibrated>``, ``<stage>/hard_ratio`` and ``<stage>/hard_examples``.
    """

    name = "example.mine_hard"
    Options = MineHardOptions

    def fits_on(self) -> list[tuple[str, str]]:  # stagewise.evaluate then refuses this split
        return [(self.options.split, "calibrated the router and mined the hard examples")]

    def run(self, state: stagewise.State) -> dict[str, Any]:
        o = self.options
        router = o.router.component()(o.router.options)
        losses = per_example_losses(state.model, state.batches(o.split, shard=False))  # every rank: the same indices
        calibrated = router.calibrate(losses)
        routing = router.route(losses)
        hard = routing.masks["hard"].nonzero().flatten()  # (n_hard,) indices into the split
        state.artifacts[HARD_EXAMPLES] = {"split": o.split, "indices": hard, "router": router.state_dict()}
        state.keep_router(self.label, router)  # checkpointed, and written by `stagewise export` beside the weights
        return {**{f"{self.label}/{k}": v for k, v in calibrated.items()},
                f"{self.label}/hard_ratio": routing.ratio("hard"), f"{self.label}/hard_examples": len(hard)}


class TrainHard(stagewise.TrainStage):
    """``stagewise.train`` (every key works the same) on only the examples an earlier
    ``example.mine_hard`` stage found hard, reshuffled each epoch when ``data.shuffle`` is set."""

    name = "example.train_hard"

    def check(self, recipe: Recipe, index: int, data: DataSplits) -> list[str]:
        """Refused before anything runs, not once the stages before it have trained: no mining stage first."""
        problems = super().check(recipe, index, data)
        if not any(spec.use == MineHard.name for spec in recipe.stages[:index]):
            problems.append(f"{recipe.stage_path(index)}: example.train_hard trains on the examples an earlier "
                            f"example.mine_hard stage found; add one before it")
        return problems

    def train_batches(self, state: stagewise.State, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        data, indices = self._hard(state)
        for ids in self._index_lists(state, epoch)[start:]:
            yield to_device(default_collate([data[indices[i]] for i in ids]), state.device)

    def batches_per_epoch(self, state: stagewise.State) -> int:
        return len(self._index_lists(state, epoch=0))

    def _index_lists(self, state: stagewise.State, epoch: int) -> list[list[int]]:
        """Batches of positions in the hard list; the order depends on (seed, stage, epoch) only."""
        spec, n = state.recipe.data, len(self._hard(state)[1])
        order = epoch_order(n, state.seed, state.stage_index, epoch) if spec.shuffle else None
        return batch_indices(n, spec.batch_size, order=order, drop_last=spec.drop_last,
                             rank=state.dist.rank, world=state.dist.world_size)

    def _hard(self, state: stagewise.State) -> tuple[Any, list[int]]:
        found = state.artifacts[HARD_EXAMPLES]  # an earlier mine_hard put it there (see check)
        return state.data[found["split"]], found["indices"].tolist()
