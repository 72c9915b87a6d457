"""Data pipeline: loaders, preprocessing (k-core, remap, splits, cache), training batches,
synthetic data. ``load_dataset`` is the one entry point from a source to a cached Dataset."""
from .batches import TrainSampler, eval_batches, pad_histories  # noqa: F401
from .loaders import (Interactions, load_comirec, load_csv, load_interactions,  # noqa: F401
                      load_parquet, load_recbole, read_item_categories, read_user_split,
                      with_item_categories)
from .preprocess import (Dataset, EvalSplit, default_cache_dir, kcore, load_dataset,  # noqa: F401
                         preprocess, synthetic_dataset)
from .synthetic import synthetic  # noqa: F401
