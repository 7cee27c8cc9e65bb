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
    install_requires=[
        "pymongo==4.20.0",
        "Ming==0.17.3",
        "pyzmq==27.3.0",
        "gevent==26.9.0",
        "PyYAML==6.0.3",
        # The web service: a well-kept WSGI framework (served by gevent.pywsgi) ...
        "Flask==3.1.3",
        # ... and the dashboard's chart library: the plotly.min.js this package ships.
        "plotly==7.1.0",
    ],
    extras_require={
        "test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "hypothesis==6.170.17",
                 # drives Debian's chromium-driver in the browser tests
                 "selenium==4.51.0"],
    },
    entry_points={
        "console_scripts": [
            "zcmd = zarkov.cli.main:main",
            "zsend = zarkov.eventlog.zsend:main",
        ],
    },
    scripts=[],
)
