"""Class-description files in CuPL's JSON format (``{"classname": ["sentence", ...], ...}``) for APE.

APE's ``extract_features.py`` looks each class up by its name with ``_`` read as a space, so both
spellings are accepted here. The file's SHA-256 goes into the store key: other sentences, another store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError


@dataclass(frozen=True)
class Descriptions:
    """The sentences of a description file, one tuple per class in the dataset's class order."""

    path: Path
    sha256: str
    sentences: tuple[tuple[str, ...], ...]

    def record(self) -> dict:
        """What the manifest and the run records say about the file."""
        return {"file": str(self.path), "sha256": self.sha256, "sentences": sum(map(len, self.sentences))}


def load_descriptions(path: str | Path, classnames: Sequence[str]) -> Descriptions:
    """Read and check ``path`` against ``classnames``; a bad file is refused naming the file and the problem."""
    path = Path(path).expanduser()

    def bad(problem: str) -> UsageError:
        return UsageError(f"--descriptions {path}: {problem}")

    try:
        raw = path.read_bytes()
    except OSError as err:
        raise bad(f"cannot read it ({err.strerror or err})") from err
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad(f"not JSON ({err})") from err
    if not isinstance(data, dict):
        raise bad(f'expected a JSON object {{"classname": ["sentence", ...]}}, got a {type(data).__name__}')
    missing, sentences = [], []
    for name in classnames:
        key = name if name in data else name.replace("_", " ")
        if key not in data:
            missing.append(name)
            continue
        value = data[key]
        if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
            raise bad(f"class '{key}' must map to a non-empty list of sentences (strings)")
        sentences.append(tuple(value))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise bad(
            f"no sentences for {len(missing)} of {len(classnames)} classes: {', '.join(missing[:5])}{more}"
        )
    return Descriptions(path.resolve(), hashlib.sha256(raw).hexdigest(), tuple(sentences))
