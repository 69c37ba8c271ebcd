"""`dalle-ar train masked --config FILE [--resume] [key=value ...]`: the masked generator.

The transformer recipe (`dalle_ar.train.transformer`: the same data, loop, guidance dropout and
DDP) with the model's objective "masked": each sample's image codes are [MASK]ed at a share drawn
from the cosine schedule and the loss is the cross-entropy at the masked positions only
(`objectives.mask_codes`, `objectives.masked_loss`; MaskGIT, Chang et al. 2022). Every layer is
bidirectional over the image. The final model is the component folder out_dir/masked, a
transformer folder `dalle_ar.sampling.masked.generate_masked` samples from.
"""

from __future__ import annotations

import dataclasses

from dalle_ar.config import require
from dalle_ar.models.transformer import TransformerConfig
from dalle_ar.train.common import run_recipe
from dalle_ar.train.transformer import TrainTransformerConfig, _report, train


def _masked_model() -> TransformerConfig:
    return TransformerConfig(objective="masked", layouts="bidir")


@dataclasses.dataclass
class TrainMaskedConfig(TrainTransformerConfig):
    model: TransformerConfig = dataclasses.field(default_factory=_masked_model)
    text_loss_weight: float = 0.0  # no text position is predicted

    def validate(self) -> None:
        super().validate()
        require(self.model.masked, "model.objective", "must be 'masked' for this recipe")


def main(argv: list[str] | None = None) -> int:
    return run_recipe(
        TrainMaskedConfig, train, argv, "dalle-ar train masked", __doc__,
        "configs/<data>/masked.yaml", _report,
    )  # fmt: skip
