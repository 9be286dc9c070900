// @peculiar/x509 throws at load time unless reflect-metadata is loaded before it. Every module
// here takes the library from this file so that the order cannot be got wrong by an import list.
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';

export { x509 };
