"""Data pipeline: loaders, preprocessing (k-core, remap, splits, cache), samplers, synthetic data."""
from .loaders import (Interactions, load_comirec, load_csv, load_interactions,  # noqa: F401
                      load_parquet, load_recbole)
from .preprocess import Dataset, EvalSplit, kcore, load_dataset, preprocess  # noqa: F401
from .sampler import TrainSampler, eval_batches, pad_histories  # noqa: F401
from .synthetic import synthetic, synthetic_dataset  # noqa: F401
