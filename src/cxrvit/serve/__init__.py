"""``cxrvit serve``: a reading-room web page and JSON API over one model bundle (docs/serve.md)."""
