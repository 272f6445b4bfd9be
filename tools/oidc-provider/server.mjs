// A real OpenID Connect provider for carecache's tests: panva's oidc-provider (the
// certified Node.js implementation) with two test clients and synthetic staff, on HTTP
// on loopback. The sign-in page is this file's own (the provider leaves interactions to
// the host): it takes a user name and the test password and finishes login and consent
// in one step.
//
// Environment: PORT (0 = any free port), ID_TOKEN_TTL (seconds, default 600). Keys are
// made fresh at every start (an RS256 and an ES256 key), so restarting the provider is a
// key rotation. Prints `listening http://127.0.0.1:PORT` once ready.
//
// Clients (public, PKCE required, loopback redirects on any port):
// - carecache-viewer: the daemon's own sign-in through its viewer; ID tokens RS256.
// - crew-app: crew software that signs its user in and hands the ID token to the
//   daemon; ID tokens ES256.
//
// Staff (password `test-password` for all): claims `uid` (the staff id) and
// `selected_roleid` (the role chosen at sign-in, as NHS CIS2 names them).
import http from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import Provider from 'oidc-provider';

const STAFF = {
  'paramedic.one': { uid: 'P1001', selected_roleid: 'R-PARAMEDIC', name: 'Test Paramedic One' },
  'nurse.two': { uid: 'N2002', selected_roleid: 'R-NURSE', name: 'Test Nurse Two' },
  'carer.three': { uid: 'S3003', selected_roleid: 'R-SOCIAL-CARE', name: 'Test Social Carer Three' },
  // Signed in without choosing a role (a token with no role claim).
  'agency.four': { uid: 'A4004', name: 'Test Agency Worker Four' },
};
const PASSWORD = 'test-password';

function key(type, options, alg) {
  const { privateKey } = generateKeyPairSync(type, options);
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, alg, use: 'sig', kid: `${alg.toLowerCase()}-${randomBytes(6).toString('hex')}` };
}

const port = Number(process.env.PORT ?? 0);
const ttl = Number(process.env.ID_TOKEN_TTL ?? 600);

const server = http.createServer();
server.listen(port, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: 'carecache-viewer',
        application_type: 'native',
        token_endpoint_auth_method: 'none',
        redirect_uris: ['http://127.0.0.1/viewer/oidc/callback'],
        grant_types: ['authorization_code'],
        response_types: ['code'],
        id_token_signed_response_alg: 'RS256',
      },
      {
        client_id: 'crew-app',
        application_type: 'native',
        token_endpoint_auth_method: 'none',
        redirect_uris: ['http://127.0.0.1/crew/callback'],
        grant_types: ['authorization_code'],
        response_types: ['code'],
        id_token_signed_response_alg: 'ES256',
      },
    ],
    jwks: {
      keys: [
        key('rsa', { modulusLength: 2048 }, 'RS256'),
        key('ec', { namedCurve: 'P-256' }, 'ES256'),
      ],
    },
    enabledJWA: { idTokenSigningAlgValues: ['RS256', 'ES256'] },
    claims: { openid: ['sub', 'uid', 'selected_roleid'], profile: ['name'] },
    conformIdTokenClaims: false,
    findAccount: async (_ctx, id) => {
      const who = STAFF[id];
      if (!who) return undefined;
      return { accountId: id, claims: async () => ({ sub: id, ...who }) };
    },
    pkce: { required: () => true },
    ttl: { IdToken: ttl, AccessToken: ttl, Grant: 3600, Interaction: 600, Session: 3600 },
    cookies: { keys: [randomBytes(32).toString('hex')] },
    features: { devInteractions: { enabled: false } },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  });
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  const callback = provider.callback();

  server.on('request', async (req, res) => {
    const url = new URL(req.url, issuer);
    const m = url.pathname.match(/^\/interaction\/([^/]+)(\/login)?$/);
    if (!m) return callback(req, res);
    try {
      const details = await provider.interactionDetails(req, res);
      if (req.method === 'GET' && !m[2]) {
        res.setHeader('content-type', 'text/html; charset=utf-8');
        res.end(`<!doctype html><title>Sign in</title><h1>Test identity provider</h1>
<form method="post" action="/interaction/${details.uid}/login">
<label>User <input name="login" autocomplete="username"></label>
<label>Password <input name="password" type="password"></label>
<button type="submit">Sign in</button></form>`);
        return;
      }
      if (req.method === 'POST' && m[2]) {
        const body = await new Promise((resolve, reject) => {
          let data = '';
          req.on('data', (c) => { data += c; if (data.length > 4096) reject(new Error('too large')); });
          req.on('end', () => resolve(new URLSearchParams(data)));
          req.on('error', reject);
        });
        const login = body.get('login') ?? '';
        if (!STAFF[login] || body.get('password') !== PASSWORD) {
          res.statusCode = 401;
          res.end('wrong user or password');
          return;
        }
        const grant = new provider.Grant({ accountId: login, clientId: details.params.client_id });
        grant.addOIDCScope(details.params.scope ?? 'openid');
        const grantId = await grant.save();
        await provider.interactionFinished(
          req,
          res,
          { login: { accountId: login }, consent: { grantId } },
          { mergeWithLastSubmission: false },
        );
        return;
      }
      res.statusCode = 405;
      res.end();
    } catch (err) {
      res.statusCode = 400;
      res.end(String(err.message ?? err));
    }
  });
  console.log(`listening ${issuer}`);
});
