"""The generated block of docs/galleries.md, from the results JSON alone (nothing is measured here)."""

from __future__ import annotations

from typing import Any

from benchmarks.common.docblock import cell
from benchmarks.fewshot import IMAGENET, IMAGENET_96

COLUMNS = (
    ("k1", "k = 1"),
    ("k5", "k = 5"),
    ("k1_centered", "k = 1, centered"),
    ("k5_centered", "k = 5, centered"),
    ("k5_vote", "k = 5, vote of 5"),
)
"""Score keys of a row and their column headings: examples per class, then the variant."""


def score_cell(score: dict[str, float]) -> str:
    """ "0.97 (0.95–0.99)": the mean over seeds and, when they differ, the range."""
    if score["min"] == score["max"]:
        return f"{score['mean']:.2f}"
    return f"{score['mean']:.2f} ({score['min']:.2f}–{score['max']:.2f})"


def table(section: dict[str, Any]) -> list[str]:
    """One Markdown table: a row per representation, a column per `COLUMNS` score."""
    lines = [
        "| representation | dim | " + " | ".join(heading for _, heading in COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(COLUMNS),
    ]
    for row in section["rows"]:
        cells = [score_cell(row[key]) if key in row else "–" for key, _ in COLUMNS]
        lines.append(f"| {row['representation']} | {row['dim']} | " + " | ".join(cells) + " |")
    return lines


def _setup(section: dict[str, Any], what: str) -> str:
    classes = section["classes"]
    seeds = section["seeds"]
    return (
        f"{what}: {len(classes)} classes (chance {1 / len(classes):.2f}), {section['queries']} queries per "
        f"seed, seeds {seeds[0]}–{seeds[-1]}."
    )


def _row(section: dict[str, Any], prefix: str) -> dict[str, Any]:
    return next(row for row in section["rows"] if row["representation"].startswith(prefix))


def render(results: dict[str, Any]) -> str:
    photos, digits = results["photos"], results["digits"]
    unseen, seen = digits["unseen"], digits["seen"]
    views = photos["views"]
    lines = [
        "Top-1 of the product's search (`service/galleries/search.py`): the label of the nearest gallery "
        "example, or of the vote among the 5 nearest; each cell is the mean over seeds with the range. "
        "*k* is the number of gallery examples per class; *centered* subtracts the gallery's mean row "
        "before the cosine.",
        "",
        "**Photos.** "
        + _setup(photos, "Each class one of scikit-image's photos")
        + f" Views are square crops of {views['crop_fraction_of_shorter_side'][0]:.2f} to "
        f"{views['crop_fraction_of_shorter_side'][1]:.2f} of the shorter side, flipped half the time, "
        f"resized to {views['output_side_px'][0]}–{views['output_side_px'][1]} px, sent as "
        f"{views['encoding']}; a query overlaps no gallery crop of its class by more than "
        f"{views['max_query_overlap_iou']} IoU. Classes: "
        + ", ".join(f"{n} ({k})" for n, k in photos["classes"].items())
        + ".",
        "",
        *table(photos),
        "",
        "**Digits 5–9, unseen by the fine-tune.** "
        + _setup(unseen, "scikit-learn's 8×8 digits")
        + " Every 5–9 digit not in the gallery is a query.",
        "",
        *table(unseen),
        "",
        "**Digits 0–4, the fine-tune's own classes** (gallery from its training images, queries held out "
        "from it). " + _setup(seen, "The same representations"),
        "",
        *table(seen),
        "",
        *_fine_tunes(digits),
        "",
        *_summary(photos, unseen, seen),
    ]
    return "\n".join(lines) + "\n"


def _fine_tunes(digits: dict[str, Any]) -> list[str]:
    lines = []
    for tune in digits["fine_tunes"]:
        options = tune["options"]
        lines.append(
            f"- Fine-tune {options['frozen_epochs']}+{options['unfrozen_epochs']} epochs: "
            f"{tune['backbone']}, {tune['images']} images of {', '.join(tune['classes'])} at "
            f"{options['image_size']} px, validation accuracy {tune['val_accuracy']:.3f}, "
            f"{tune['seconds']:.0f} s."
        )
    for model, layers in digits["unchanged_by_fine_tune"].items():
        lines.append(
            f"- {model}: {', '.join(layers)} not listed: the fine-tune left them frozen, so their rows are "
            "those of the ImageNet weights at 96 px."
        )
    return lines


def _summary(photos: dict[str, Any], unseen: dict[str, Any], seen: dict[str, Any]) -> list[str]:
    """The tables' answer in two sentences, so the prose around the block can stay free of figures."""
    raw_photos, raw_digits = _row(photos, "raw pixels"), _row(unseen, "raw pixels")
    default_photos = _row(photos, f"{IMAGENET}: embedding")
    models = [row for row in unseen["rows"] if not row["representation"].startswith("raw pixels")]
    best = max(models, key=lambda row: row["k5"]["mean"])
    tuned = [row for row in models if row["representation"].endswith("epochs: embedding")]
    return [
        f"In short: on photos the default model's embedding finds the right class for "
        f"{_mean(default_photos, 'k1')} of the queries from one example per class, raw pixels for "
        f"{_mean(raw_photos, 'k1')}. On digits 5–9 with 5 examples per class, raw pixels reach "
        f"{_mean(raw_digits, 'k5')}; the fine-tuned embeddings "
        + " and ".join(_mean(row, "k5") for row in tuned)
        + " (on their own classes 0–4: "
        + " and ".join(_mean(_row(seen, row["representation"]), "k5") for row in tuned)
        + f"); the ImageNet default {_mean(_row(unseen, f'{IMAGENET}: embedding'), 'k5')}, the same weights "
        f"at 96 px {_mean(_row(unseen, f'{IMAGENET_96}: embedding'), 'k5')}; the best model representation "
        f"is {best['representation']} at {_mean(best, 'k5')}."
    ]


def _mean(row: dict[str, Any], key: str) -> str:
    return f"{row[key]['mean']:.2f}"


def render_scale(results: dict[str, Any]) -> str:
    """The block of `python -m benchmarks.fewshot.scale`: query latency and memory by gallery size, what
    an empty gallery answers, and `/predict` while adds run."""
    model, photo = results["model"], results["photo"]
    machine = results["machine"]
    lines = [
        f"{model['name']} version {model['version']} (embedding D = {model['embedding_size']}) behind "
        f"`python -m service`, on {machine['logical_cpus']} CPUs ({machine['cpu_model']}, load average "
        f"{machine['load_average_1_5_15'][0]} at the start). Latency: {results['requests']} rounds at "
        f"concurrency 1 of `/predict?mode=gallery` and plain `/predict` on the same {photo['megapixels']} MP "
        "photo; *search* is the difference, what the gallery adds for a user; *server search* is the "
        "mean of `convserve_gallery_query_seconds`.",
        "",
        "| entries | classifier p50 / p99 ms | gallery p50 / p99 ms | search p50 / p99 ms | server search "
        "ms | first query ms | RSS MB | RSS bytes / entry |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in results["sizes"]:
        classifier, gallery, search = size["classifier"], size["gallery"], size["difference_ms"]
        lines.append(
            f"| {size['entries']} | {_pair(classifier)} | {_pair(gallery)} | {_pair(search)} | "
            f"{cell(size['server_search_mean_ms'])} | {cell(size['first_query_ms'], 0)} | "
            f"{cell(size['rss_mb'], 0)} | {cell(size['memory']['rss_bytes_per_entry'], 0)} |"
        )
    empty = results["empty_gallery"]
    lines += [
        "",
        f"An empty gallery answers {empty['status']}: \u201c{empty['error']}\u201d",
        "",
        *_memory(results),
        "",
        *_adds(results["adds"]),
    ]
    return "\n".join(lines) + "\n"


def _pair(summary: dict[str, Any]) -> str:
    return f"{cell(summary['p50_ms'])} / {cell(summary['p99_ms'])}"


def _memory(results: dict[str, Any]) -> list[str]:
    """Where an entry's bytes go, at the largest size measured."""
    largest = max(results["sizes"], key=lambda size: size["entries"])
    memory = largest["memory"]
    return [
        f"Memory at {largest['entries']} entries: the server's RSS after its first gallery query, minus that "
        f"of a server whose gallery holds {results['baseline']['entries']} entries, is "
        f"{cell(memory['rss_bytes_per_entry'], 0)} bytes an entry. Of those, the embedding row is "
        f"{memory['embedding_bytes_per_entry']} (4 x D), the spare rows the store's buffer keeps for growth "
        f"{cell(memory['spare_row_bytes_per_entry'], 0)}, and the store's ids, labels, entry records and "
        f"indexes {cell(memory['store_other_bytes_per_entry'], 0)} (traced in the store opened on its own: "
        f"{cell(memory['store_bytes_per_entry'], 0)} in all); the remaining "
        f"{cell(memory['server_other_bytes_per_entry'], 0)} is what the server process holds beyond the "
        "store's own objects (the allocator's free pages after the journal's replay, the first search's "
        "buffers)."
    ]


def _adds(adds: dict[str, Any]) -> list[str]:
    without, during = adds["without_adds"], adds["with_adds"]
    verdict = "within" if adds["within_target"] else "not within"
    present = "all there" if adds["all_present"] else "NOT all there"
    return [
        f"Adds under load: {adds['clients']} clients sending `/predict` back to back while one more added "
        f"{adds['images']} photos (seeded crops, embedded for real) in requests of {adds['per_request']}, "
        f"which took {cell(adds['window_s'])} s ({cell(adds['images_per_s'])} images/s). `/predict` "
        f"p50 / p99 without adds {_pair(without)} ms ({without['requests']} requests in flight during a "
        f"window as long, after them), while adding {_pair(during)} ms ({during['requests']} requests): "
        f"p99 ratio {cell(adds['p99_ratio'], 2)}, {verdict} the {adds['target_p99_ratio']}x target. "
        f"`GET …/gallery` afterwards counted {adds['added_entries_counted']} added entries: {present}."
    ]
