"""A Mistral tokenizer file of the medium model's kind, made without the model hub.

The medium model's own ``tekken.json`` comes with its weights, from a hub these tests cannot
reach. This stands in for it: the Tekken vocabulary that ``mistral-common`` ships (its Pixtral
tokenizer, the same 131k-token family), declared as version v11 with the control tokens a v11
file lists ([SYSTEM_PROMPT], [AVAILABLE_TOOLS], [TOOL_CALLS], [ARGS], [CALL_ID], ...), so that
the chat format, tool definitions and tool calls are those of the real model's generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import mistral_common

_CONTROL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
            "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
_RANKS = {**{token: rank for rank, token in enumerate(_CONTROL)}, "[ARGS]": 32, "[CALL_ID]": 33}


def v11_tekken(folder: Path) -> Path:
    """Write the stand-in tokenizer file into ``folder``; its path."""
    source = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    data = json.loads(source.read_text())
    data["config"]["version"] = "v11"
    by_rank = {rank: token for token, rank in _RANKS.items()}
    data["special_tokens"] = [{"rank": rank, "token_str": by_rank.get(rank, f"<SPECIAL_{rank}>"), "is_control": True}
                              for rank in range(max(by_rank) + 1)]
    data.pop("multimodal", None)
    data.pop("image", None)
    path = folder / "tekken.json"
    path.write_text(json.dumps(data))
    return path
