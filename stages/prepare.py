"""DVC stage: load the raw dataset, hold out the validation set, save it as tensors."""

from pathlib import Path

from lth import hparams
from lth.data import data_root, prepare, prepared_path
from lth.pipeline import DATA_DIR

if __name__ == "__main__":
    hp = hparams.load()
    sizes = prepare(hp.dataset, prepared_path(Path(DATA_DIR), hp.dataset), data_root())
    print(f"lth: prepared {hp.dataset.name}: {sizes}")
