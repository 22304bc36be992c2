"""Every backend block passes Prefect's standard block test suite, with its logo checked offline.

Prefect's own logo test downloads ``_logo_url`` whenever Pillow is installed;
here it is replaced by a check of the logo file shipped in the package: it
exists, is a square PNG of a size the UI expects, and ``_logo_url`` names it.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from ferry.backends.elasticsearch import ElasticsearchBackend, OpenSearchBackend
from ferry.backends.logos import LOGO_FOLDER, RAW_URL, SOURCE_URL, logo_path
from ferry.backends.memory import MemoryBackend
from ferry.backends.objectstore import ObjectStoreBackend
from ferry.backends.postgres import PostgresBackend

REPO = Path(__file__).resolve().parents[2]

#: Every block class and the slug it was first published under (slugs never change:
#: saved blocks and job files name them).
BLOCKS: dict[type[Block], str] = {
    MemoryBackend: "ferry-memory",
    ObjectStoreBackend: "ferry-object-store",
    PostgresBackend: "ferry-postgres",
    ElasticsearchBackend: "ferry-elasticsearch",
    OpenSearchBackend: "ferry-opensearch",
}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; ValueError when ``data`` is not a PNG."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def logo_file_name(block: type[Block]) -> str:
    """The file a block's ``_logo_url`` names, checked to lie in the logo folder."""
    url = str(block._logo_url)
    prefix = f"{RAW_URL}/{LOGO_FOLDER}/"
    assert url.startswith(prefix), f"{block.__name__}._logo_url {url} is not a shipped logo under {prefix}"
    return url.removeprefix(prefix)


class TestBackendBlocks(BlockStandardTestSuite):
    """Prefect's standard checks (description, documentation URL, field descriptions, code example), per block."""

    @pytest.fixture(params=list(BLOCKS), ids=lambda b: b.__name__)
    def block(self, request) -> type[Block]:
        return request.param

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        name = logo_file_name(block)
        path = logo_path(name)
        assert path.is_file(), f"{block.__name__}'s logo {name} is not in the installed package"
        width, height = png_size(path.read_bytes())
        assert width == height, "a logo is square"
        assert 45 < width < 1000, f"the UI wants a logo between 46 and 999 px wide, not {width}"

    def test_slug_never_changes(self, block: type[Block]) -> None:
        assert block.get_block_type_slug() == BLOCKS[block]

    def test_documentation_url_names_a_page_of_the_user_guide(self, block: type[Block]) -> None:
        url = str(block._documentation_url)
        prefix = f"{SOURCE_URL}/blob/main/"
        assert url.startswith(prefix)
        assert (REPO / url.removeprefix(prefix)).is_file(), f"{url} names no file of the repository"

    def test_the_code_example_names_the_block_in_a_job_file(self, block: type[Block]) -> None:
        assert f"block: {BLOCKS[block]}/BLOCK_NAME" in block.get_code_example()

    def test_the_block_type_passes_prefect_client_validation(self, block: type[Block]) -> None:
        # Prefect's client refuses a block type whose logo or docs URL is not http(s).
        block_type = block._to_block_type()
        assert str(block_type.logo_url) == str(block._logo_url)
        assert str(block_type.documentation_url) == str(block._documentation_url)


def test_the_logo_check_refuses_what_is_not_a_png(tmp_path):
    assert png_size(logo_path("postgres.png").read_bytes())[0] > 45
    with pytest.raises(ValueError):
        png_size(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    with pytest.raises(ValueError):
        png_size(PNG_SIGNATURE + b"\x00" * 30)


def test_every_shipped_logo_belongs_to_a_block():
    shipped = {p.name for p in logo_path("postgres.png").parent.glob("*.png")}
    assert shipped == {logo_file_name(b) for b in BLOCKS}


def test_the_wheel_ships_the_logos(tmp_path):
    """Build the wheel from a copy of the sources: the package data must include every logo."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("backends", "tasks", "flows", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--no-deps",
         "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("ferry-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for block in BLOCKS:
        assert f"ferry/backends/logos/{logo_file_name(block)}" in names
