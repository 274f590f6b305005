"""Cross-modal contrastive alignment: one shared transformer for text and images.

encoder.py   the shared encoder and its config (AlignConfig, presets)
heads.py     per-modality projection heads and AlignModel
loss.py      InfoNCE, both directions
moco.py      momentum contrast (EMA key encoder, queues) and the in-batch baseline
data.py      image-caption pairs: a captions.jsonl folder or the built-in emoji set
metrics.py   Recall@k both ways and matching accuracy
train.py     training loop, evaluation, checkpoints
index.py     flat embedding index for search
"""

from densa.multimodal.encoder import AlignConfig, SharedEncoder
from densa.multimodal.heads import AlignModel, ProjectionHead
from densa.multimodal.index import RetrievalIndex
from densa.multimodal.moco import ContrastConfig, ContrastiveAligner, EmbeddingQueue, momentum_update

__all__ = [
    "AlignConfig",
    "AlignModel",
    "ContrastConfig",
    "ContrastiveAligner",
    "EmbeddingQueue",
    "ProjectionHead",
    "RetrievalIndex",
    "SharedEncoder",
    "momentum_update",
]
