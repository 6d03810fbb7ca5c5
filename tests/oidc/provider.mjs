// An OpenID Provider for tests/test_oidc.py: node-oidc-provider as an operator would run it
// (discovery, JWKS, client credentials, RFC 9068 `at+jwt` access tokens for a resource
// indicator), on a loopback port, plus a few test controls under /__test/ that a real
// deployment does its own way: rotating the signing keys, going down, the JWKS's
// Cache-Control.
//
// Configuration: a JSON file named by the first argument:
//   {"audience": "...", "keys": [private JWKs], "clients": [{"client_id", "client_secret",
//    "claims": {...extra access-token claims}}]}
// A resource indicator urn:gateway:<ALG> asks for an access token signed with <ALG>
// (the provider's key of that type), audience `audience`.
// Prints `listening <port>` once it answers.
import http from 'node:http';
import { readFileSync } from 'node:fs';

import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const claimsOf = Object.fromEntries(config.clients.map((c) => [c.client_id, c.claims || {}]));
const state = { down: false, cacheControl: null, provider: null, keys: config.keys };

function build(issuer, keys) {
  const provider = new Provider(issuer, {
    clients: config.clients.map(({ client_id, client_secret }) => ({
      client_id,
      client_secret,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
    })),
    jwks: { keys },
    scopes: ['gateway'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => undefined,
        useGrantedResource: () => false,
        getResourceServerInfo: (ctx, resource) => {
          const alg = resource.startsWith('urn:gateway:') ? resource.slice('urn:gateway:'.length) : null;
          if (!alg) throw new Provider.errors.InvalidTarget();
          return {
            scope: 'gateway',
            audience: config.audience,
            accessTokenTTL: 300,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg } },
          };
        },
      },
    },
    extraTokenClaims: (ctx, token) => claimsOf[token.clientId],
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  return provider;
}

const server = http.createServer((req, res) => {
  if (req.url.startsWith('/__test/')) {
    control(req, res);
    return;
  }
  if (state.down) {
    req.socket.destroy();
    return;
  }
  if (state.cacheControl && req.url.startsWith('/jwks')) {
    const writeHead = res.writeHead.bind(res);
    res.writeHead = (...args) => {
      res.setHeader('cache-control', state.cacheControl);
      return writeHead(...args);
    };
  }
  state.provider.callback()(req, res);
});

function control(req, res) {
  let body = '';
  req.on('data', (chunk) => { body += chunk; });
  req.on('end', () => {
    const given = body ? JSON.parse(body) : {};
    if (req.url === '/__test/keys') {
      state.keys = given.keys;
      state.provider = build(state.provider.issuer, state.keys);
    } else if (req.url === '/__test/down') {
      state.down = Boolean(given.down);
    } else if (req.url === '/__test/cache-control') {
      state.cacheControl = given.value || null;
    } else {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(204).end();
  });
}

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  state.provider = build(`http://127.0.0.1:${port}`, state.keys);
  console.log(`listening ${port}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
