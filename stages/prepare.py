"""DVC stage: load the raw dataset, hold out the validation set, save it as tensors."""

from pathlib import Path

from lth import hparams
from lth.data import DataError, data_root, prepare, prepared_path
from lth.pipeline import DATA_DIR

if __name__ == "__main__":
    hp = hparams.load_or_exit()
    try:
        sizes = prepare(hp.dataset, prepared_path(Path(DATA_DIR), hp.dataset), data_root())
    except DataError as e:  # missing, truncated or corrupt files: the message names the file and the fix
        raise SystemExit(f"lth: {e}") from None
    print(f"lth: prepared {hp.dataset.name}: {sizes}")
