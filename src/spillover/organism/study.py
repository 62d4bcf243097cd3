"""The geometry study on the organism: its own TopK SAEs at every layer, then the paper's analysis."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from ..activations import collect_tokens
from ..data import ChatSample
from ..sae import load_sae
from ..sae_training import TopKTrainingConfig, train_sae_folder
from ..study import GeometryConfig, run_geometry
from .datasets import finetune_set, reference_set
from .model import Organism, load_organism
from .world import TRAINING_DOMAIN, domain_named

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrganismStudyConfig:
    n_per_set: int = 480
    """Samples in each of the four sets (inducing, control, toxic and harmless references)."""
    sae_conversations: int = 1000
    """Conversations from the world's stream whose tokens (about 57k) train each layer's SAE."""
    sae: TopKTrainingConfig = dataclasses.field(
        default_factory=lambda: TopKTrainingConfig(d_sae=1024, k=16, steps=400, batch_size=512))
    geometry: GeometryConfig = dataclasses.field(default_factory=GeometryConfig)
    seed: int = 0
    domain: str = TRAINING_DOMAIN
    """The narrow domain of the inducing set and its control; the toxic references span all domains."""

    def __post_init__(self) -> None:
        domain_named(self.domain)


def study_sets(organism: Organism, n: int, seed: int,
               domain: str = TRAINING_DOMAIN) -> dict[str, list[ChatSample]]:
    """Inducing data of one domain and its aligned twin; toxic and harmless answers across all domains."""
    world = organism.world
    return {
        "inducing": finetune_set(world, "inducing", n, seed, domain),
        "control": finetune_set(world, "aligned", n, seed, domain),
        "toxic": reference_set(world, "toxic", n, seed),
        "harmless": reference_set(world, "harmless", n, seed),
    }


def organism_saes(organism: Organism, out_dir: Path, config: OrganismStudyConfig) -> dict[int, object]:
    """One SAE per layer, trained on the tokens of fresh conversations; reused when already saved."""
    rng = random.Random(f"sae/{config.seed}")
    conversations = [organism.world.sample_conversation(rng) for _ in range(config.sae_conversations)]
    samples = [ChatSample(f"sae-{i}", tuple(c.messages())) for i, c in enumerate(conversations)]
    saes = {}
    for layer in range(organism.model.config.num_hidden_layers):
        folder = out_dir / "sae" / f"layer_{layer}"
        if (folder / "cfg.json").exists():
            saes[layer] = load_sae(folder)
            continue
        tokens = collect_tokens(organism.model, organism.tokenizer, samples, layer, tokens="all")
        sae, report = train_sae_folder(tokens, dataclasses.replace(config.sae, seed=config.seed), folder,
                                       extra={"tokens": len(tokens)})  # resumes a killed run's checkpoint
        log.info("layer %d SAE: FVU %.3f, L0 %.1f, dead %.3f", layer, report.fvu, report.l0, report.dead_fraction)
        saes[layer] = sae
    return saes


def run_organism_geometry(out_dir: str | Path, config: OrganismStudyConfig = OrganismStudyConfig(),
                          cache_dir: str | Path | None = None) -> dict:
    """Train the organism's SAEs (or reuse them) and run the geometry study at every layer."""
    out = Path(out_dir)
    organism = load_organism(cache_dir=cache_dir)
    saes = organism_saes(organism, out, config)
    sets = study_sets(organism, config.n_per_set, config.seed, config.domain)
    about = {"organism_study": {"domain": config.domain, "n_per_set": config.n_per_set, "seed": config.seed}}
    return run_geometry(organism.model, organism.tokenizer, sets, saes, out, config.geometry, about)
