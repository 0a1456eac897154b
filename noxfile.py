"""Sessions to build and serve the site, run every example, lint, and refresh notebooks."""

from __future__ import annotations

import sys

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "docs", "test"]
nox.options.reuse_existing_virtualenvs = False

MINIMUM_PYTHON = (3, 11)
SITE_ADDRESS = "127.0.0.1:8000"


def require_python(session: nox.Session) -> None:
    if sys.version_info < MINIMUM_PYTHON:
        session.error(
            f"nox runs on Python {sys.version.split()[0]}, and the project needs 3.11 or "
            "newer: run nox with a newer interpreter (pipx run --python python3.11 nox ...)"
        )


def install_group(session: nox.Session, group: str) -> None:
    """Install one dependency group from pyproject.toml, unless the venv is reused (-R)."""
    require_python(session)
    session.install("--upgrade", "pip>=25.1")
    session.install("--group", group)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the site into site/ with strict checks."""
    install_group(session, "docs")
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"}
    )


@nox.session
def serve(session: nox.Session) -> None:
    """Serve the site on http://127.0.0.1:8000 and rebuild it on changes."""
    install_group(session, "docs")
    session.run(
        "mkdocs",
        "serve",
        "--dev-addr",
        SITE_ADDRESS,
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def test(session: nox.Session) -> None:
    """Run every example and test against a database; arguments go to pytest."""
    install_group(session, "test")
    # Installs the npm packages of the JavaScript examples, or prints why they will be skipped.
    session.run("python", "-m", "tests.harness.node", "install")

    arguments = list(session.posargs)
    parallel = any(argument.startswith(("-n", "--numprocesses")) for argument in arguments)
    # pytest-examples rewrites pages from one process only, so updates run serially.
    if "--update-examples" in arguments:
        if parallel:
            session.error("--update-examples rewrites pages from one process: drop the -n option")
    elif not parallel:
        arguments = ["-n", "auto", *arguments]
    session.run("python", "-m", "pytest", *arguments)


@nox.session
def lint(session: nox.Session) -> None:
    """Check and format-check the Python code with ruff."""
    install_group(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def facts(session: nox.Session) -> None:
    """List facts in facts.yml last checked more than a year ago; fail when there are any."""
    require_python(session)
    # Reading facts.yml needs only a YAML parser, not the whole test group.
    session.install("pyyaml>=6.0,<7")
    session.run("python", "-m", "tests.harness.facts", "stale", *session.posargs)


@nox.session
def notebooks(session: nox.Session) -> None:
    """Execute the tutorial notebooks against a database and save their outputs."""
    install_group(session, "test")
    session.run("python", "-m", "tests.harness.notebooks")
