fn main() {
    eprintln!(
        "cas-server {} (protocol v{}): the server is not implemented yet",
        env!("CARGO_PKG_VERSION"),
        cas_server::protocol::PROTOCOL_VERSION
    );
    std::process::exit(2);
}
