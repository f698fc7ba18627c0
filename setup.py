"""mico_ds: omni-modal (MiCo) pretraining on DeepSpeed."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
reqs = [
    line.split("#", 1)[0].strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.split("#", 1)[0].strip()
]
# The tools are console scripts too (tools/*.py stay, as thin wrappers, where users expect them).
TOOLS = ["zero_to_fp32", "to_universal", "make_shards", "make_demo_data", "split_subsets", "inspect_shards",
         "train_tokenizer", "index_shards"]  # fmt: skip

setup(
    name="mico_ds",
    version="0.1.0",
    description="Distributed omni-modal (MiCo) pretraining on DeepSpeed ZeRO-3",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mico_ds", "mico_ds.*"]),
    # Package data, read through importlib.resources (mico_ds/resources.py): a wheel carries it.
    package_data={"mico_ds": ["recipes/*.yaml", "recipes/*/*.yaml", "ds_configs/*.json"]},
    install_requires=reqs,
    entry_points={
        "console_scripts": [
            "mico-train=mico_ds.train.__main__:main",
            "mico-eval=mico_ds.eval.__main__:main",
            "mico-plan=mico_ds.planner.cli:main",
            *[f"mico-{t.replace('_', '-')}=mico_ds.cli.{t}:main" for t in TOOLS],
        ]
    },
)
