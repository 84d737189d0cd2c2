"""Copy triton_models/medium into ops/k8s/triton.yaml: the model's ConfigMap (config.pbtxt,
1/model.json, 1/model.py, byte for byte), the checksum annotation that restarts the pods when
it changes, and the pinned Triton image (triton_models/medium/image.toml).

    python ops/k8s/sync_model.py          # rewrite ops/k8s/triton.yaml
    python ops/k8s/sync_model.py --check  # exit 1 when it differs (what the unit test checks)
"""

from __future__ import annotations

import hashlib
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MEDIUM = ROOT / "triton_models" / "medium"
TRITON_YAML = ROOT / "ops" / "k8s" / "triton.yaml"
#: ConfigMap key -> file of the model directory, in the order they are written.
FILES = {"config.pbtxt": "config.pbtxt", "model.json": "1/model.json", "model.py": "1/model.py"}


def model_digest() -> str:
    """sha256 of the model directory's files, in FILES order."""
    return hashlib.sha256("".join((MEDIUM / path).read_text() for path in FILES.values()).encode()).hexdigest()


def pinned_image() -> str:
    return tomllib.loads((MEDIUM / "image.toml").read_text())["image"]


def configmap_data() -> str:
    """The ConfigMap's data block, each file as a literal block scalar."""
    out = ["data:"]
    for key, path in FILES.items():
        out.append(f"  {key}: |")
        out += [f"    {line}" if line else "" for line in (MEDIUM / path).read_text().rstrip("\n").split("\n")]
    return "\n".join(out) + "\n"


def synced(text: str) -> str:
    head, found, rest = text.partition("\ndata:\n")  # the ConfigMap, the first document
    _, sep, tail = rest.partition("\n---\n")
    if found and sep:
        text = head + "\n" + configmap_data() + "---\n" + tail
    text = re.sub(r'(fleet/model-config-sha256: )"[0-9a-f]*"', rf'\1"{model_digest()}"', text)
    return re.sub(r"image: nvcr\.io/nvidia/tritonserver:\S+", f"image: {pinned_image()}", text)


def main() -> int:
    current = TRITON_YAML.read_text()
    wanted = synced(current)
    if "--check" in sys.argv:
        return 0 if wanted == current else 1
    TRITON_YAML.write_text(wanted)
    print("ops/k8s/triton.yaml", "rewritten" if wanted != current else "already in step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
