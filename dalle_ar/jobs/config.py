"""The main job's config (`dalle-ar pipeline [--config FILE] [key=value ...]`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from dalle_ar.config import require, require_precision
from dalle_ar.eval.fidelity import GUIDED_SCALE
from dalle_ar.sampling.settings import (
    ARSampling,
    MaskedSampling,
    PriorSampling,
    RerankSettings,
    UpsampleSampling,
    reranker_parts,
)

STAGE_SETTINGS = "stage_settings.json"  # in out_dir: each finished stage's MADE_FROM values


@dataclasses.dataclass
class MainJobConfig:
    out_dir: str = "runs/main"  # every stage writes below this folder
    config_dir: str = ""  # the component YAMLs; empty = the data set's folder of configs/ here
    # the data set (dalle_ar.jobs.plan.DATA_SETS): the procedural shapes, the emoji
    # (configs/emoji/main.yaml), or pictures of your own at `data_src` (configs/emoji/main.yaml
    # with data=shards or data=folder): shards in img2dataset layout or a folder of pictures
    # with same-stem .txt captions
    data: Literal["shapes", "emoji", "shards", "folder"] = "shapes"
    data_src: str = ""  # your shards (paths, a folder of .tar, a brace glob) or picture folder
    eval_fraction: float = 0.05  # of your own records, held out for the evaluation
    num_train: int = 50_000  # training images (shapes; the emoji set is fixed)
    num_eval: int = 2_000  # evaluation images (held-out combinations appear only here)
    # Training budgets in optimizer steps (x each config's batch); 0 = the component config's
    # run.steps. The same config and seed see the same samples on any machine; the numerics follow
    # the precision (and float rounding).
    vq_steps: int = 0
    transformer_steps: int = 0
    # The CLIP stage's budget: a third of configs/shapes/clip.yaml's 3,000 steps keeps the job
    # within 30 minutes on 2 CPU cores (docs/results.md#clip); 0 = the config's
    clip_steps: int = 1000
    # Safety caps, not budgets: a stage stopped by one is reported under-trained (log, summary,
    # table) and continues to its planned steps when the job runs again. 0 = no cap.
    vq_max_minutes: float = 15.0
    transformer_max_minutes: float = 45.0
    clip_max_minutes: float = 30.0  # 1,000 steps took 12.9 min on one thread beside the transformer
    prior_train_steps: int = 0  # the diffusion prior's budget; 0 = configs/<data>/prior.yaml's
    prior_max_minutes: float = 10.0
    # Train a CLIP (dalle_ar.models.clip) and rerank with it; false: no CLIP stage, PMI reranking
    # only
    clip: bool = True
    # The prior mode (DALL-E 2): token shards with the CLIP's embeddings (clip_tokens/), a
    # diffusion prior trained on them, and the transformer fine-tuned to read the CLIP image
    # embedding too (DALL-E 2's decoder): it starts from the trained text-only one and learns to
    # read the embedding for `cond_transformer_steps` at `cond_transformer_lr` (the embedding
    # dropped to a learned null one `cond_transformer_embed_drop` of the time). That one model
    # then draws in both modes, text mode with the null embedding: fine-tuned so, it draws text
    # mode's shapes as the text-only one does (docs/results.md#one-transformer-for-both-modes),
    # where one trained from scratch with the embedding drew them far worse (guidance 1.5:
    # 69.8% / 29.8% seen / held-out against 93.8% / 44.7%; docs/results.md#prior-mode). The grid
    # and the evaluation run in both modes. It stands on the CLIP stage (prior=true with
    # clip=false is refused). Off by default: its stages do not fit the job's 30 minutes.
    prior: bool = False
    embed_tokens: int = 2  # stream positions the CLIP image embedding is projected to
    cond_transformer_steps: int = 2000  # the fine-tuning's budget (batches of the transformer's)
    # its peak LR (the transformer's own was 1e-3): at 5e-4 the fresh embedding path first undoes
    # part of the copied model, and the prior mode drew held-out pairs 4.7 points under 2e-4's on
    # the means of two fine-tuning seeds each (docs/results.md#the-fine-tunings-learning-rate)
    cond_transformer_lr: float = 2e-4
    cond_transformer_embed_drop: float = 0.5  # share of records with the null embedding
    cond_transformer_max_minutes: float = 15.0  # a safety cap, as the others
    # The masked mode (MaskGIT): a masked generator trained on the same token shards for
    # `masked_steps` (0 = configs/<data>/masked.yaml's), shown and scored beside the
    # autoregressive modes; where that config starts it from a transformer (`init_from`, the
    # shapes' 3,000 steps of the transformer's network, which the transformer stage runs 10,000
    # of) it starts from the job's own. Off by default: its stage and its sampling add about 9
    # minutes to the job's 30 (measured, docs/results.md#masked-mode). With it a shapes job's
    # CLIP stage trains with count foils (`count_foils`, its pictures >= 21 pixels), which lift
    # the masked mode's best-of-16 picks.
    masked: bool = False
    masked_steps: int = 0
    masked_max_minutes: float = 45.0
    # The cascade (Imagen): the data set's scenes at twice the size (`upsampler_images` of
    # them), an upsampler trained on them for `upsampler_steps` (0 = configs/<data>/
    # upsampler.yaml's), the grid shown upsampled beside the small one and the guided single
    # draws scored once more upsampled.
    upsampler: bool = True
    upsampler_images: int = 20_000
    upsampler_steps: int = 0
    upsampler_max_minutes: float = 15.0
    # auto | fp32 | bf16, for both training stages (run.precision): auto trains the transformer
    # under bf16 autocast where the CPU or GPU has bf16, the VQ-VAE in fp32 on a CPU
    precision: str = "auto"
    prompts: list[str] = dataclasses.field(default_factory=list)  # grid; empty = the data set's
    samples_per_prompt: int = 4  # images per prompt in the grid
    fidelity_prompts: int = 400  # evaluation-split prompts scored by the data set's evaluation
    fidelity_composed: bool = False  # score composed prompts too (shapes.composed_prompt)
    # Sampling for the grid, the evaluation and the pipeline folder's defaults. Guidance 1.5
    # measured best on the shapes (docs/results.md); at guidance 3 the model adds stray objects.
    # Temperature 0.5: on an 8,000-step fp32 model 90.1% / 35.1% (seen / held-out) against
    # 89.1% / 32.2% at 0.7 (docs/results.md#budgets-in-steps). part_scale weighs each part of a
    # composed prompt.
    sampling: ARSampling = dataclasses.field(
        default_factory=lambda: ARSampling(
            temperature=0.5, guidance_scale=GUIDED_SCALE, part_scale=0.5
        )
    )
    # Each grid image is the best of `candidates` by `reranker` ("clip" needs the CLIP stage;
    # "pmi" is the transformer's own caption-image score, dalle_ar.rerank), and the evaluation
    # runs once more that way, by PMI, by CLIP and by both side by side; candidates 1 = none.
    rerank: RerankSettings = dataclasses.field(
        default_factory=lambda: RerankSettings(candidates=16, reranker="clip")
    )
    prior_sampling: PriorSampling = dataclasses.field(default_factory=PriorSampling)
    # guidance rising over the passes (on the shapes, constant guidance draws an object twice in
    # a quarter of the seen scenes), less noise on the unmasking order than MaskGIT's 4.5, and 24
    # passes, not 12 or 16 (at 12 an object came out twice in a tenth of the seen scenes; over
    # four sampling seeds 16 passes drew seen pairs 5.5 points under the transformer, 24 passes
    # 2.3): each raised seen and held-out pairs (docs/results.md#masked-mode and
    # #passes-and-the-corrector-on-the-jobs-own-models; not measured on emoji; 24 passes stay
    # within 3 points on the mean of four seeds only, missing on two of them). At an 8x8 grid 24
    # passes are 3/8 of the 64 an autoregressive image takes.
    masked_sampling: MaskedSampling = dataclasses.field(
        default_factory=lambda: MaskedSampling(
            steps=24,
            temperature=1.0,
            guidance_scale=GUIDED_SCALE,
            guidance_schedule="linear",
            confidence_temperature=1.0,
        )
    )
    upsample_sampling: UpsampleSampling = dataclasses.field(default_factory=UpsampleSampling)
    seed: int = 0  # data, training and sampling seed
    device: str = "auto"  # auto | cpu | cuda
    # Stages run side by side where one needs nothing of the other (the CLIP and the upsampler
    # beside the transformer), each in a process of its own with its share of the free CPUs; a
    # training stage takes the CPUs the other leaves when it ends (runtime.CPUShare). 0 = 2 on
    # a CPU where at least 1.5 CPUs are idle at the start, else 1; on a GPU, one after another.
    # On 2 CPU cores, two processes of the transformer's training step, one thread each, did
    # 1.34x the work of one process on two threads (bf16; docs/results.md#stages-side-by-side).
    lanes: int = 0
    wandb: str = "offline"  # offline | online | disabled

    def sampling_settings(self) -> dict[str, Any]:
        """The job's sampling settings as the evaluations take them (`eval.quality.mode_settings`
        keywords): the autoregressive, prior and cascade fields and the rerank weight flat, the
        masked mode's own under "masked"."""
        return {**dataclasses.asdict(self.sampling), "rerank_weight": self.rerank.rerank_weight,
                **dataclasses.asdict(self.prior_sampling),
                **dataclasses.asdict(self.upsample_sampling),
                "masked": dataclasses.asdict(self.masked_sampling)}  # fmt: skip

    def pipeline_defaults(self) -> dict[str, dict[str, Any]]:
        """The pipeline folder's defaults (`assemble(defaults=)`): every mode's sampling settings
        and the rerank weight; its candidates stay 1, so `dalle-ar sample --model` draws once
        per sample unless asked for more."""
        rerank = dataclasses.replace(self.rerank, candidates=1, keep=1)
        return {"ar": dataclasses.asdict(self.sampling), "rerank": dataclasses.asdict(rerank),
                "prior": dataclasses.asdict(self.prior_sampling),
                "masked": dataclasses.asdict(self.masked_sampling),
                "upsample": dataclasses.asdict(self.upsample_sampling)}  # fmt: skip

    @property
    def count_foils(self) -> bool:
        """Whether the CLIP stage trains with count foils (`train.clip`'s `count_foils`): with
        the masked mode on the shapes, whose best-of-16 picks they fix."""
        return self.clip and self.masked and self.data == "shapes"

    def validate(self) -> None:
        require(self.num_train >= 100, "num_train", "must be >= 100")
        require(0 < self.eval_fraction < 1, "eval_fraction", "must be in (0, 1)")
        require(self.num_eval >= 10, "num_eval", "must be >= 10")
        for key in ("vq_steps", "transformer_steps", "clip_steps", "prior_train_steps",
                    "vq_max_minutes", "transformer_max_minutes", "clip_max_minutes",
                    "prior_max_minutes", "masked_steps", "masked_max_minutes",
                    "upsampler_steps", "upsampler_max_minutes", "cond_transformer_steps",
                    "cond_transformer_max_minutes"):  # fmt: skip
            require(getattr(self, key) >= 0, key, "must be >= 0")
        require(self.upsampler_images >= 100, "upsampler_images", "must be >= 100")
        require(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")
        require(self.fidelity_prompts >= 0, "fidelity_prompts", "must be >= 0")
        require(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        require(self.lanes >= 0, "lanes", "must be >= 0 (0 = auto)")
        require_precision(self.precision)
        require(self.clip or not self.prior, "prior",
                "needs the CLIP stage (clip=true): it draws CLIP image embeddings")  # fmt: skip
        require(self.clip or "clip" not in reranker_parts(self.rerank.reranker), "rerank.reranker",
                f"is {self.rerank.reranker!r}, which needs the CLIP stage (clip=true)")  # fmt: skip
        require(self.embed_tokens >= 1, "embed_tokens", "must be >= 1")
        require(self.cond_transformer_lr > 0, "cond_transformer_lr", "must be > 0")
        e = self.cond_transformer_embed_drop
        require(0 <= e <= 1, "cond_transformer_embed_drop", f"must be in [0, 1], got {e}")
        require(self.wandb in ("offline", "online", "disabled"), "wandb", "offline|online|disabled")
