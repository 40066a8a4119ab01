// `hello-js`: a wasi:http component in JavaScript, built by componentize-js
// (SpiderMonkey, via StarlingMonkey). It uses the Service Worker `fetch`
// event, as Cloudflare Workers and Fastly Compute do; StarlingMonkey exports
// wasi:http/incoming-handler for it.
//
//   GET  /js/hello?name=you     {"message": "Hello, you!", ...}
//   POST /js/hello              {"name": "you"} -> the same greeting
//   an event (a queue message {"name": "you"}, a timer, a blob): Kelvin
//   POSTs {"Data": ..., "Metadata": ...} with an x-kelvin-trigger header
//
// Built with (see docs/languages.md):
//   componentize-js guests/hello-js/app.js --wit guests/hello-js/wit \
//       -o target/guests/hello-js.wasm

addEventListener('fetch', (event) => event.respondWith(handle(event.request)));

function json(status, value) {
  return new Response(JSON.stringify(value) + '\n', {
    status,
    headers: { 'content-type': 'application/json' },
  });
}

async function handle(request) {
  const trigger = request.headers.get('x-kelvin-trigger');
  if (trigger) {
    // An event: a 2xx is success (a queue message is then deleted).
    const event = await request.json();
    const data = event.Data || {};
    const name = typeof data.name === 'string' ? data.name : 'world';
    console.error(`${trigger} event: greeting ${name}`);
    return json(200, { message: `Hello, ${name}!`, trigger });
  }
  const url = new URL(request.url);
  let name = url.searchParams.get('name') || 'world';
  if (request.method === 'POST') {
    let body;
    try {
      body = await request.json();
    } catch (e) {
      return json(400, { error: `the body is not JSON: ${e.message}` });
    }
    if (typeof body !== 'object' || body === null || typeof body.name !== 'string') {
      return json(400, { error: 'send {"name": "..."}' });
    }
    name = body.name;
  }
  // Logged to stderr: Kelvin forwards it under this invocation's id.
  console.error(`greeting ${name}`);
  return json(200, { message: `Hello, ${name}!`, language: 'javascript', method: request.method });
}
