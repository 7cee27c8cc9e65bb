"""Zarkov: event logger, ZeroMQ map-reduce and incremental aggregation on MongoDB."""
from setuptools import find_packages, setup

setup(
    name="zarkov",
    version="0.1.0",
    description="Near-real-time analytics on your own MongoDB: event logger, "
                "map-reduce cluster and incremental aggregation service",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["zarkov", "zarkov.*"]),
    package_data={"zarkov.web": ["templates/*.html", "static/*.js", "static/*.css"]},
    python_requires=">=3.9",
    # Compatible ranges, so that Zarkov installs into an existing environment; the
    # exact versions make test uses are pinned in constraints.txt.  pymongo 4.18+
    # (wire version 9 and up: MongoDB 4.4 and later).
    install_requires=[
        "pymongo>=4.18,<5",
        "Ming>=0.17,<0.18",
        "pyzmq>=26,<28",
        "gevent>=24.2,<27",
        "PyYAML>=6,<7",
        # The web service: a well-kept WSGI framework (served by gevent.pywsgi) ...
        "Flask>=3.1,<4",
        # ... and the dashboard's chart library: the plotly.min.js this package ships.
        "plotly>=6,<8",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "hypothesis>=6.100,<7",
                 # drives Debian's chromium-driver in the browser tests
                 "selenium>=4.20,<5"],
    },
    entry_points={
        "console_scripts": [
            "zcmd = zarkov.cli.main:main",
            "zsend = zarkov.eventlog.zsend:main",
        ],
    },
    scripts=[],
)
