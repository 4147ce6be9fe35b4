"""The input of ``llamascope batch submit FOLDER PROMPT``: one chat-completions request an image, the image
inline as a ``data:`` URI, written to a file as it is made (a folder of any size never sits in memory), and
checked against the Batch API's limits before anything is sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

from llamascope.client.attachment import data_uri
from llamascope.client.batches import CHAT_ENDPOINT

# The Batch API's limits (DashScope's and llamascope's): a line, a file, lines in a file.
MAX_LINE_BYTES = 6 * 1024 * 1024
MAX_FILE_BYTES = 500 * 1024 * 1024
MAX_LINES = 50_000
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jp2"})
MB = 1024 * 1024


class InputProblem(Exception):
    """The batch cannot be built or sent as asked: the message says why, for a person."""


# -- the input file -----------------------------------------------------------------------------------------


def images_in(folder: Path) -> list[Path]:
    """The images directly in ``folder``, by name (hidden files and other files left out)."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def request_line(custom_id: str, image: str, prompt: str, model: str, parameters: dict[str, Any]) -> bytes:
    """One line of the input: a chat-completions request with the image and the prompt."""
    messages: list[dict[str, Any]] = []
    if parameters.get("system"):
        messages.append({"role": "system", "content": parameters["system"]})
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    body = {"model": model, "messages": messages, **{k: v for k, v in parameters.items() if k != "system"}}
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": body}
    return json.dumps(line, ensure_ascii=False).encode()


def build_input(folder: Path, prompt: str, model: str, parameters: dict[str, Any], target: BinaryIO) -> int:
    """Write one request an image of ``folder`` to the binary file ``target``; the number of lines.
    InputProblem (before anything is sent) names every image whose line is over the API's 6 MB, and a folder
    with no image or over the API's other limits."""
    images = images_in(folder)
    if not images:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise InputProblem(f"no images in {folder} (files ending in {suffixes})")
    if len(images) > MAX_LINES:
        raise InputProblem(f"{len(images)} images in {folder}: a batch takes at most {MAX_LINES:,}; split the folder")
    too_big: list[str] = []
    written = 0
    for path in images:
        data = path.read_bytes()
        line = request_line(path.name, data_uri(data, path.name), prompt, model, parameters)
        if len(line) > MAX_LINE_BYTES:
            too_big.append(f"  {path.name}: {len(data) / MB:.1f} MB, its request line {len(line) / MB:.1f} MB")
            continue
        if not too_big:
            target.write(line + b"\n")
            written += len(line) + 1
            if written > MAX_FILE_BYTES:
                raise InputProblem(f"the images of {folder} make over 500 MB of requests, a batch's limit: split it")
    if too_big:
        raise InputProblem(
            "over the 6 MB a request line may have (an image grows by a third as base64, so about 4.5 MB an "
            "image at most); shrink these or move them out of the folder:\n" + "\n".join(too_big)
        )
    return len(images)


def endpoint_of(path: Path) -> str:
    """The ``url`` of a JSONL input file's first line (the batch's endpoint must equal it)."""
    with path.open("rb") as source:
        first = source.readline(MAX_LINE_BYTES + 1)
    try:
        url = json.loads(first).get("url")
    except (ValueError, AttributeError):
        url = None
    return url if isinstance(url, str) and url else CHAT_ENDPOINT
