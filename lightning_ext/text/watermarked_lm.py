"""``WatermarkedCausalLM``: WASA's watermarked language model as a LightningModule (train, attribute, generate)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optimization import check_optimization, configure_optimization
from lightning_ext.core.optional import require
from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_choice,
    check_non_negative,
    check_number,
    check_positive_int,
)
from lightning_ext.text.wasa import (
    PAD,
    WATERMARK_CHARS,
    CharTokenizer,
    WasaGPT,
    extract_watermark,
    forced_watermarks,
    generate,
    nearest_provider,
    wasa_loss,
)

__all__ = ["WatermarkedCausalLM"]


class WatermarkedCausalLM(LightningModule):
    r"""A small GPT-2 trained with WASA's watermarks, so that it embeds its data providers' watermarks in generated
    text and attributes a text to the provider whose data it resembles.

    Paper: "WASA: WAtermark-based Source Attribution for Large Language Model-Generated Data" (Wang, Lu, Zhao et al.,
    arXiv 2310.00646; no reference code was found, see :mod:`lightning_ext.text.wasa`). The network is
    :class:`~lightning_ext.text.wasa.WasaGPT`: transformers' ``GPT2Model`` built from a ``GPT2Config`` (never
    downloaded) with separate text and watermark embeddings and heads. Training minimises the separated-space loss
    :math:`L = L_{text} + \lambda L_{wtm}` (:func:`~lightning_ext.text.wasa.wasa_loss`; text targets scored by a
    softmax over the text vocabulary only, watermark targets by a softmax over the six watermark symbols only), on
    batches ``(input_ids, targets, provider, clean_ids)`` from
    :class:`~lightning_ext.text.source_attribution.SourceAttributionTextDataModule`, whose watermark table the module
    takes in ``setup`` and keeps in its checkpoint.

    Logs ``train_loss``, ``train_text_loss``, ``train_wm_loss``; ``{val,test}_text_loss`` (nats per text character,
    text space only, so it compares with an un-watermarked model), ``{val,test}_bpc``, ``{val,test}_wm_loss`` and
    ``{val,test}_attribution_acc``: on the first ``attribution_batches`` batches, the watermark regenerated after
    each un-watermarked held-out text (forced decoding in the watermark space) matched to the nearest provider.

    Args:
        n_layer, n_embd, n_head, context_length, dropout: the GPT-2.
        watermark_length: watermark characters per provider (WASA: 10).
        num_watermark_symbols: size of the watermark alphabet (WASA: 6).
        watermark_loss_weight: :math:`\lambda`.
        attribution_batches: evaluation batches per epoch with attribution (0: off).
        lr, weight_decay, optimizer, scheduler, scheduler_interval: the optimiser (default AdamW).
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.

    Example:
        >>> lm = WatermarkedCausalLM(n_layer=1, n_embd=32, n_head=2, context_length=64)
        >>> lm.set_watermarks(["\u200b\u200c" * 5, "\u200d\u2062" * 5])
        >>> text = lm.generate_text(["The "], max_new_tokens=8, seed=0)[0]
        >>> len(text) == 8, lm.attribute(["some text"])[0] in (0, 1)
        (True, True)
    """

    def __init__(
        self,
        n_layer: PositiveInt = 2,
        n_embd: PositiveInt = 128,
        n_head: PositiveInt = 4,
        context_length: PositiveInt = 128,
        dropout: UnitIntervalRightOpen = 0.1,
        watermark_length: PositiveInt = 10,
        num_watermark_symbols: PositiveInt = 6,
        watermark_loss_weight: NonNegativeFloat = 1.0,
        attribution_batches: NonNegativeInt = 4,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.01,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "step",
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        require("transformers", type(self).__name__)
        super().__init__()
        for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head),
                            ("context_length", context_length), ("watermark_length", watermark_length)):
            check_positive_int(name, value)
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}.")
        if watermark_length >= context_length:
            raise ValueError(f"watermark_length={watermark_length} must be smaller than context_length="
                             f"{context_length}.")
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        check_number("num_watermark_symbols", num_watermark_symbols, low=2, high=len(WATERMARK_CHARS), integer=True)
        check_non_negative("watermark_loss_weight", watermark_loss_weight)
        check_number("attribution_batches", attribution_batches, low=0, integer=True)
        check_optimization(lr, weight_decay)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_nonfinite_policy(nonfinite_loss)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.tokenizer = CharTokenizer(int(num_watermark_symbols))
        self.net = WasaGPT(self.tokenizer.text_vocab_size, int(num_watermark_symbols), n_layer, n_embd, n_head,
                           context_length, float(dropout))
        self.watermark_length, self.watermark_loss_weight = int(watermark_length), float(watermark_loss_weight)
        self.attribution_batches = int(attribution_batches)
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.nonfinite_loss = scheduler_interval, nonfinite_loss
        self.watermarks: list[str] = []
        self.provider_names: list[str] = []

    # ------------------------------------------------------------------------------------------- watermark table
    def set_watermarks(self, watermarks: Sequence[str], provider_names: Optional[Sequence[str]] = None) -> None:
        """Use ``watermarks`` (one string of watermark characters per provider) for attribution."""
        allowed = set(self.tokenizer.symbols)
        for mark in watermarks:
            if len(mark) != self.watermark_length or not set(mark) <= allowed:
                raise ValueError(f"Each watermark must be {self.watermark_length} characters of the model's "
                                 f"{len(allowed)} watermark symbols, got {mark!r}; match watermark_length and "
                                 "num_watermark_symbols to the datamodule.")
        self.watermarks = list(watermarks)
        self.provider_names = list(provider_names) if provider_names else [str(i) for i in range(len(watermarks))]

    @override
    def setup(self, stage: str) -> None:
        """Take the datamodule's watermark table (and check its tokenizer and context); refuse ``skip`` under DDP."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        marks = getattr(dm, "watermarks", None)
        if marks is None:
            return
        tok = getattr(dm, "tokenizer", None)
        if tok is not None and getattr(tok, "vocab_size", None) != self.tokenizer.vocab_size:
            raise ValueError(f"The datamodule's tokenizer has {tok.vocab_size} tokens but WatermarkedCausalLM has "
                             f"{self.tokenizer.vocab_size}; set num_watermark_symbols alike on both.")
        if getattr(dm, "context_length", self.net.context_length) > self.net.context_length:
            raise ValueError(f"The datamodule's context_length {dm.context_length} exceeds the model's "
                             f"{self.net.context_length}; set `model.init_args.context_length: {dm.context_length}`.")
        self.set_watermarks(marks, getattr(dm, "provider_names", None))

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the watermark table with the weights."""
        checkpoint["wasa_watermarks"] = {"watermarks": self.watermarks, "provider_names": self.provider_names}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the watermark table."""
        table = checkpoint.get("wasa_watermarks")
        if table and table["watermarks"]:
            self.set_watermarks(table["watermarks"], table["provider_names"])

    # ------------------------------------------------------------------------------------------- training
    @override
    def forward(self, ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text and watermark logits of token ids ``(B, T)``."""
        return self.net(ids, attention_mask)

    def loss(self, batch: Any) -> dict[str, torch.Tensor]:
        """The WASA loss terms of one batch."""
        ids, targets = batch[0], batch[1]
        mask = (ids != PAD).long()
        mask[:, 0] = 1
        z, zw = self.net(ids, mask)
        return wasa_loss(z, zw, targets, self.tokenizer.text_vocab_size, self.watermark_loss_weight)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """The separated-space loss of one batch."""
        terms = self.loss(batch)
        if not check_loss(self, terms["loss"], self.nonfinite_loss, batch):
            return None
        self.log("train_loss", terms["loss"], prog_bar=True)
        self.log("train_text_loss", terms["text_loss"])
        self.log("train_wm_loss", terms["wm_loss"])
        return terms["loss"]

    def _evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        terms = self.loss(batch)
        n = batch[0].shape[0]
        self.log(f"{stage}_loss", terms["loss"], batch_size=n, sync_dist=True)
        self.log(f"{stage}_text_loss", terms["text_loss"], batch_size=n, sync_dist=True, prog_bar=True)
        self.log(f"{stage}_bpc", terms["text_loss"] / torch.log(torch.tensor(2.0)), batch_size=n, sync_dist=True)
        self.log(f"{stage}_wm_loss", terms["wm_loss"], batch_size=n, sync_dist=True)
        if self.watermarks and batch_idx < self.attribution_batches and len(batch) > 3:
            clean, labels = batch[3], batch[2]
            seqs = [row[row != PAD].tolist() for row in clean]
            found = self.attribute_ids(seqs)
            acc = (torch.tensor(found, device=labels.device) == labels).float().mean()
            self.log(f"{stage}_attribution_acc", acc, batch_size=n, sync_dist=True, prog_bar=True)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Text-space loss, watermark loss and attribution accuracy of held-out texts."""
        self._evaluate(batch, batch_idx, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Text-space loss, watermark loss and attribution accuracy of test texts."""
        self._evaluate(batch, batch_idx, "test")

    @override
    def configure_optimizers(self):
        """The injected optimiser (default AdamW) and scheduler."""
        return configure_optimization(self, self.parameters())

    # ------------------------------------------------------------------------------------------- attribution
    def _need_watermarks(self) -> None:
        if not self.watermarks:
            raise RuntimeError("WatermarkedCausalLM has no watermark table: fit it with a "
                               "SourceAttributionTextDataModule or call set_watermarks(...) first.")

    def attribute_ids(self, seqs: Sequence[Sequence[int]]) -> list[int]:
        """Provider index of each token sequence by watermark regeneration (forced decoding after it)."""
        self._need_watermarks()
        was = self.net.training
        self.net.eval()
        try:
            symbols = forced_watermarks(self.net, [list(s) or [self.tokenizer.encode(" ")[0]] for s in seqs],
                                        self.watermark_length)
        finally:
            self.net.train(was)
        marks = ["".join(self.tokenizer.symbols[k] for k in row) for row in symbols]
        return [nearest_provider(m, self.watermarks) for m in marks]

    def attribute(self, texts: Sequence[str], mode: Literal["auto", "embedded", "regenerate"] = "auto",
                  min_symbols: Optional[int] = None) -> list[int]:
        """Provider index of each text: ``"embedded"`` reads the watermark characters it carries (nearest by
        Hamming/edit distance; -1 when it has fewer than ``min_symbols``, default half a watermark),
        ``"regenerate"`` strips them and regenerates the watermark after the text, ``"auto"`` reads when enough
        characters are present and regenerates otherwise."""
        self._need_watermarks()
        check_choice("mode", mode, ("auto", "embedded", "regenerate"))
        need = self.watermark_length // 2 if min_symbols is None else int(min_symbols)
        out: list[Optional[int]] = []
        todo = []
        for i, text in enumerate(texts):
            found = extract_watermark(text)
            if mode != "regenerate" and len(found) >= max(1, need):
                out.append(nearest_provider(found, self.watermarks))
            elif mode == "embedded":
                out.append(-1)
            else:
                out.append(None)
                todo.append(i)
        if todo:
            seqs = [[t for t in self.tokenizer.encode(texts[i]) if not self.tokenizer.is_watermark(t)] for i in todo]
            for i, p in zip(todo, self.attribute_ids(seqs)):
                out[i] = p
        return [int(p) for p in out]

    def generate_text(self, prompts: Sequence[str], max_new_tokens: PositiveInt = 80, temperature: float = 0.8,
                      seed: int = 0) -> list[str]:
        """Continuations of ``prompts`` sampled with a joint softmax over text and watermark tokens (they may carry
        a watermark: :meth:`attribute` reads it)."""
        check_positive_int("max_new_tokens", max_new_tokens)
        was = self.net.training
        self.net.eval()
        g = torch.Generator().manual_seed(int(seed))
        try:
            new = generate(self.net, [self.tokenizer.encode(p) for p in prompts], max_new_tokens, temperature, g)
        finally:
            self.net.train(was)
        return [self.tokenizer.decode(row) for row in new]
