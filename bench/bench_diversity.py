"""Time the Questioner's diversity penalty at the sizes of one GRPO step.

    python bench/bench_diversity.py

Prints a markdown table: seconds for bleu_distance_matrix, average_linkage_clusters
and diversity_penalty, and the peak traced (numpy + Python) memory of
diversity_penalty, for N questions drawn from a template-like vocabulary, so they
share many n-grams as the Questioner's samples do.
"""

import os
import random
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards import average_linkage_clusters, bleu_distance_matrix, diversity_penalty  # noqa: E402

COLORS = ["red", "blue", "green", "yellow", "purple", "gray", "brown", "cyan"]
SIZES = ["small", "large", "tiny", "big"]
SHAPES = ["circles", "cubes", "spheres", "cylinders", "triangles", "squares", "cars", "people"]
PLACES = ["in the image", "on the table", "to the left of the tree", "behind the red car",
          "in the top half of the picture", "next to the window", "on the shelf"]
TEMPLATES = [
    "How many {size} {color} {shape} are there {place} ?",
    "What is the total number of {color} {shape} {place} ?",
    "Are there more {color} {shape} than {color2} {shape2} {place} ?",
    "What color are the {size} {shape} {place} ?",
    "If you remove all {color} {shape} , how many {shape2} remain {place} ?",
    "Which object is closest to the {size} {color} {shape} {place} ?",
    "Is the {size} {shape} made of the same material as the {color2} {shape2} ?",
]


def synthetic_questions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES).format(
        size=rng.choice(SIZES), color=rng.choice(COLORS), color2=rng.choice(COLORS),
        shape=rng.choice(SHAPES), shape2=rng.choice(SHAPES), place=rng.choice(PLACES))
        for _ in range(n)]


def seconds(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    print("| N | bleu_distance_matrix (s) | average_linkage_clusters (s) | diversity_penalty (s) "
          "| peak memory (MB) | clusters |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (256, 1024, 4096):
        questions = synthetic_questions(n)
        t_bleu, distance = seconds(bleu_distance_matrix, questions)
        t_cluster, labels = seconds(average_linkage_clusters, distance, 0.5)
        del distance
        t_penalty, _ = seconds(diversity_penalty, questions, 0.5)
        tracemalloc.start()  # separate run: tracing slows the Python parts down
        diversity_penalty(questions, 0.5)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        print(f"| {n} | {t_bleu:.3f} | {t_cluster:.3f} | {t_penalty:.3f} | {peak:.0f} "
              f"| {labels.max() + 1} |")


if __name__ == "__main__":
    main()
