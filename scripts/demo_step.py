"""One LoRA training step on the tiny demo model, on a batch read from the preprocess cache.

This is the last stage of `make demo` until `flowtune train` lands: after `flowtune make-tiny`,
`flowtune make-dataset` and `flowtune preprocess`, it checks the cache against the recipe (as
training will), reads one bucket batch through the cached loader, wraps the transformer with LoRA
through peft and runs `FlowMatchingPipeline.step` + an optimizer step, printing what it did.

Usage: python scripts/demo_step.py recipes/tiny-flux-demo.yaml [overrides...]
"""

from __future__ import annotations

import sys
import time

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from flowtune.data.cache import check_cache
from flowtune.data.loader import BucketBatchSampler, CacheCollator, CachedDataset
from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.flow_matching import create_pipeline
from flowtune.model_files import resolve_pretrained
from flowtune.quiet import quiet_libraries
from flowtune.recipe import load_recipe
from flowtune.train.model import add_lora, load_transformer
from flowtune.train.noise import sample_generators

console = Console()


def main(argv: list[str]) -> None:
    quiet_libraries()
    recipe = load_recipe(argv[0], argv[1:])
    family = get_family(recipe.model.family)
    dtype = getattr(torch, recipe.model.dtype)
    torch.manual_seed(recipe.train.seed)
    start = time.perf_counter()

    # What training will do: refuse a stale cache, then read bucket batches from it.
    data = CachedDataset(check_cache(recipe))
    sampler = BucketBatchSampler(data.buckets, recipe.train.batch_size, seed=recipe.train.seed)
    batch = CacheCollator(data.sequence_fields)([data[i] for i in next(iter(sampler))])
    latents, text, pooled = batch["image_latents"], batch["text_embeddings"], batch["pooled_prompt_embeds"]

    model_dir = resolve_pretrained(recipe.model.pretrained, recipe.model.revision, ["transformer"])
    transformer = load_transformer(family, model_dir, dtype, recipe.model.variant)
    trainable = add_lora(
        transformer,
        family,
        rank=recipe.lora.rank,
        alpha=recipe.lora.alpha,
        dropout=recipe.lora.dropout,
        target_modules=recipe.lora.target_modules,
        init=recipe.lora.init,
    )
    optimizer = torch.optim.AdamW(trainable, lr=recipe.optimizer.lr)

    flow = create_pipeline(
        family.adapter, OmegaConf.to_container(recipe.model.adapter), **OmegaConf.to_container(recipe.flow)
    )
    generators = sample_generators(recipe.train.seed, 0, range(recipe.train.batch_size))
    _, loss, _, metrics = flow.step(transformer, batch, dtype=dtype, generator=generators)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, recipe.train.max_grad_norm)
    optimizer.step()
    elapsed = time.perf_counter() - start

    table = Table(title="flowtune demo: one LoRA training step", show_header=False)
    table.add_row("model", f"{recipe.model.family} from {recipe.model.pretrained}")
    table.add_row("cache", f"{len(data)} items in {recipe.data.cache_dir}: {batch['captions'][0]!r}")
    table.add_row(
        "batch", f"latents {tuple(latents.shape)}, T5 {tuple(text.shape)}, CLIP pooled {tuple(pooled.shape)}"
    )
    table.add_row(
        "LoRA", f"rank {recipe.lora.rank}, {sum(p.numel() for p in trainable):,} trainable parameters"
    )
    table.add_row("sigma", f"{metrics['sigma_mean']:.3f} ({metrics['sampling_method']})")
    table.add_row("loss", f"{metrics['loss']:.5f} (unweighted {metrics['unweighted_loss']:.5f})")
    table.add_row("grad norm", f"{float(grad_norm):.5f}")
    table.add_row("time", f"{elapsed:.2f} s")
    console.print(table)
    console.print(
        "`flowtune train` and `flowtune sample` will replace this step; "
        "`flowtune validate recipes/tiny-flux-demo.yaml` shows the recipe."
    )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    try:
        main(sys.argv[1:])
    except FlowtuneError as exc:
        Console(stderr=True).print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
