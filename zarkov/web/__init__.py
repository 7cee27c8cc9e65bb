"""The web service: the original's JSON query API, a dashboard, and events over HTTP.

``WebServer(config).start()`` serves :func:`zarkov.web.app.create_app` with gevent's
WSGI server on ``web_bind``:``web_port`` (``zcmd web-server``, or inside ``zcmd
serve``).  Modules: ``app`` (the WSGI app, access control), ``api`` / ``query`` /
``filters`` / ``keys`` (the query API), ``status`` (AggDefs, jobs, health), ``rate``
(event rate), ``events`` / ``intake`` (events over HTTP), ``dashboard`` (the page).
"""
