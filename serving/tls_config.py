"""A uvicorn Config whose TLS context refuses protocol versions older than TLS 1.2 (Apple's minimum).

At module level so uvicorn can pickle it into worker processes.
"""

from __future__ import annotations

import ssl

import uvicorn


class Tls12Config(uvicorn.Config):
    """uvicorn.Config with ``minimum_version = TLSv1_2`` on the server's SSL context."""

    def load(self) -> None:
        super().load()
        if self.ssl is not None:
            self.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
