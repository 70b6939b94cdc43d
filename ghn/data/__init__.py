"""Input pipelines: offline defaults (MNIST-5k, Python's help texts), CIFAR, WikiText, folders.

```
ds = ghn.data.get_dataset("mnist5k", "train")
it = ds.iterator(batch_size=128, seed=0, process_index=0, process_count=1)
batch = next(it)            # {"image": float32 (128, 28, 28, 1), "label": int32 (128,)}
saved = it.state()          # plain ints; it.restore(saved) resumes exactly
train, val = ghn.data.split_images("mine", images, labels)  # your arrays, split as MNIST-5k
```
"""

from ghn.data.dataset import (
    DATA_DIR_ENV,
    Dataset,
    DatasetNotFoundError,
    ImageDataset,
    TextDataset,
    data_root,
)
from ghn.data.images import split_images
from ghn.data.iterator import DataIterator, to_global_arrays
from ghn.data.registry import dataset_splits, get_dataset, list_datasets, register_dataset
from ghn.data.tokenizers import ByteTokenizer, GPT2Tokenizer, get_tokenizer

__all__ = [
    "DATA_DIR_ENV",
    "ByteTokenizer",
    "DataIterator",
    "Dataset",
    "DatasetNotFoundError",
    "GPT2Tokenizer",
    "ImageDataset",
    "TextDataset",
    "data_root",
    "dataset_splits",
    "get_dataset",
    "get_tokenizer",
    "list_datasets",
    "register_dataset",
    "split_images",
    "to_global_arrays",
]
