"""A report opened in headless Chromium, as a person would open it: every chart loads, offline."""
import pytest

import dataset_tool
from browser import chromium  # noqa: F401  (a pytest fixture)


@pytest.mark.slow
def test_dataset_report_opens_in_chromium_with_every_image_loaded(chromium, write_hand_made_set, tmp_path):
    write_hand_made_set(tmp_path)
    out = tmp_path / "report"
    dataset_tool.main(dataset_tool.get_args_parser().parse_args(["summary", "--root", str(tmp_path), "--json",
                                                                 "all.json", "--report", str(out), "--fold", "0",
                                                                 "--n-folds", "2"]))
    chromium.get((out / "index.html").as_uri())
    images = chromium.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
    assert len(images) >= 5  # counts, images, classes in images, folds, samples
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert not broken, f"images that did not load: {broken}"
