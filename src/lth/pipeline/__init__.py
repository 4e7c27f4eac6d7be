"""DVC around the library: rendering dvc.yaml from params, the stage scripts' shared entry, scheduling
independent stages side by side, presets, and the workspace layout."""
