"""``fanout demo``: a live room in the browser.

An embedded node with its WebSocket port on, a small HTTP server for the
page and the JavaScript SDK's browser build (:mod:`.web`), a gift service
that sends the page's gifts and pushes their receipts (:mod:`.gifts`), and
a bot that keeps the room busy through the admin API (:mod:`.bot`);
:mod:`.run` wires them together. A development tool: nothing of the node imports it.
"""
