"""mico_ds: omni-modal (MiCo) pretraining on DeepSpeed."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
reqs = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="mico_ds",
    version="0.1.0",
    description="Distributed omni-modal (MiCo) pretraining on DeepSpeed ZeRO-3",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mico_ds", "mico_ds.*"]),
    package_data={"mico_ds": ["recipes/*.yaml"]},
    install_requires=reqs,
    entry_points={
        "console_scripts": [
            "mico-train=mico_ds.train.__main__:main",
        ]
    },
)
