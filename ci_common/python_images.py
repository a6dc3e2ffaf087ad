"""Which Python versions jobs may ask for (`ci submit test --python 3.13`), and their images. Pure.

`CI_PYTHON_IMAGES` maps versions to runner images, e.g.
`3.11=ci-runner:debian-bookworm-py3.11,3.13=ci-runner:debian-trixie-py3.13`; the first entry
is the default. Unset, the one configured runner image (CI_RUNNER_IMAGE) is the only choice,
under the version its tag names (`python:3.12-slim` → 3.12, `…-py3.11` → 3.11), or `default`
when the tag names none. Servers check and store a job's version; the controller runs the job
in that version's image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ci_common.errors import InvalidInput

ENV_NAME = "CI_PYTHON_IMAGES"
UNNAMED_VERSION = "default"
_VERSION = re.compile(r"\d+\.\d+(\.\d+)?")
# `python:3.12-slim`, `…:debian-bookworm-py3.11`, `…/python3.13`: the version an image names.
_IMAGE_VERSION = re.compile(r"(?:py|python)[-:]?(\d+\.\d+)(?![\d.])")


@dataclass(frozen=True, slots=True)
class PythonImages:
    """Python versions in order (the first is the default), each with its runner image."""

    images: tuple[tuple[str, str], ...]

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(version for version, _ in self.images)

    @property
    def default(self) -> str:
        return self.images[0][0]

    def resolve(self, requested: str | None) -> str:
        """The version a job runs on: the requested one (checked) or the default."""
        if requested is None or not requested.strip():
            return self.default
        version = requested.strip()
        if version not in self.versions:
            shown = version if len(version) <= 20 else version[:17] + "..."
            raise InvalidInput(f"Python {shown!r} is not available; choose one of "
                               f"{', '.join(self.versions)} (default {self.default})")
        return version

    def image_for(self, version: str | None) -> str:
        """The image of a stored job's version (None: from before versions, the default)."""
        wanted = self.default if version is None else version
        for known, image in self.images:
            if known == wanted:
                return image
        raise InvalidInput(f"no runner image for Python {wanted} on this controller (its "
                           f"{ENV_NAME} offers {', '.join(self.versions)})")


def image_version(image: str) -> str:
    """The Python version an image's name states, or `default`."""
    match = _IMAGE_VERSION.search(image.rsplit("/", 1)[-1])
    return match.group(1) if match else UNNAMED_VERSION


def parse_python_images(text: str | None, runner_image: str) -> PythonImages:
    """CI_PYTHON_IMAGES as PythonImages; unset or blank: the runner image alone."""
    if text is None or not text.strip():
        return PythonImages(((image_version(runner_image), runner_image),))
    images: list[tuple[str, str]] = []
    for entry in text.split(","):
        if not entry.strip():
            continue
        version, sep, image = (part.strip() for part in entry.partition("="))
        if not sep or not image or not _VERSION.fullmatch(version):
            raise InvalidInput(f"{ENV_NAME}: {entry.strip()!r} is not VERSION=IMAGE "
                               "(e.g. 3.13=ci-runner:debian-trixie-py3.13)")
        if version in (known for known, _ in images):
            raise InvalidInput(f"{ENV_NAME}: Python {version} is listed twice")
        images.append((version, image))
    if not images:
        raise InvalidInput(f"{ENV_NAME} lists no VERSION=IMAGE pair")
    return PythonImages(tuple(images))
