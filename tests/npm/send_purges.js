'use strict';
// Send HTCP CLR purges with the real npm `htcp-purge` client, the way change-propagation uses it
// (new HTCPPurger({routes}), bind(), purge(urls), close()). Used by tests/test_htcp_purge_npm.py.
//
//   node send_purges.js GROUP PORT URL...                 # one purge() call with all URLs
//   echo '{"host": "239.255.1.2", "port": 4827, "urls": ["http://en.wikipedia.org/wiki/Foo"],
//          "multicast_ttl": 1, "chunk": 25, "repeat": 1}' | node send_purges.js
//
// chunk: URLs per purge() call (0: all in one call); repeat: send the URL list this many times.
// multicast_ttl: htcp-purge's option (its default 8; 0 is impossible, `|| 8` turns it into 8).
// Resolves once every datagram was handed to the kernel, closes the socket, prints one JSON line:
// {"sent": n, "first_id": 1, "last_id": n, "local": {"address", "port"}, "multicast_ttl": t}.
// The purger numbers its datagrams from 1 (HTCP transaction id), +1 per URL, per process.

const HTCPPurger = require( 'htcp-purge' );

function readStdin() {
	return new Promise( ( resolve, reject ) => {
		const chunks = [];
		process.stdin.on( 'data', ( c ) => chunks.push( c ) );
		process.stdin.on( 'end', () => resolve( Buffer.concat( chunks ).toString( 'utf8' ) ) );
		process.stdin.on( 'error', reject );
	} );
}

async function options() {
	const argv = process.argv.slice( 2 );
	if ( argv.length === 0 ) {
		return JSON.parse( await readStdin() );
	}
	if ( argv.length < 3 || argv[ 0 ] === '-h' || argv[ 0 ] === '--help' ) {
		throw new Error( 'usage: node send_purges.js GROUP PORT URL... (or JSON on stdin)' );
	}
	return { host: argv[ 0 ], port: Number( argv[ 1 ] ), urls: argv.slice( 2 ) };
}

async function main() {
	const opts = await options();
	const urls = opts.urls || [];
	const port = Number( opts.port );
	if ( !opts.host || !Number.isInteger( port ) || port < 1 || port > 65535 || !urls.length ) {
		throw new Error( 'need host, port (1-65535) and a non-empty urls list' );
	}
	const repeat = opts.repeat || 1;
	const chunk = opts.chunk || urls.length;
	const errors = [];
	const purger = new HTCPPurger( {
		routes: [ { host: opts.host, port } ], // no rule: every URL takes this route
		multicast_ttl: opts.multicast_ttl, // undefined -> the client's default, 8
		log: ( level, info ) => errors.push( `${level}: ${JSON.stringify( info )}` )
	} );
	await purger.bind(); // bind() is what sets loopback off and the TTL; purge() without it would not
	const firstId = purger.seqReqId;
	let sent = 0;
	for ( let r = 0; r < repeat; r++ ) {
		for ( let i = 0; i < urls.length; i += chunk ) {
			const part = urls.slice( i, i + chunk );
			await purger.purge( part ); // resolves when every send() callback has fired
			sent += part.length;
		}
	}
	const local = purger.socket.address();
	purger.close();
	if ( errors.length ) {
		throw new Error( errors.join( '\n' ) );
	}
	process.stdout.write( JSON.stringify( {
		sent,
		first_id: firstId,
		last_id: purger.seqReqId - 1,
		local,
		multicast_ttl: purger.options.multicast_ttl
	} ) + '\n' );
}

main().catch( ( err ) => {
	process.stderr.write( `send_purges.js: ${err && err.stack || err}\n` );
	process.exit( 1 );
} );
