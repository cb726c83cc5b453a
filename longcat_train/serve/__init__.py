"""`longcat serve`: a local page that renders and compares previews with the run's model.

Built on Starlette (ASGI routes, streaming request bodies, file responses) served by uvicorn:
both small, widely used and maintained by the encode team, and the page needs nothing more (no
templating, no websockets: the page polls). The page is plain HTML and JavaScript shipped as
package data (`static/`), with no build step. Renders go through `validation.previews`, the
render path of `longcat validate`, on one worker thread.
"""
