package zarkov.javaserver;

import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;

import de.bwaldvogel.mongo.MongoBackend;
import de.bwaldvogel.mongo.MongoDatabase;
import de.bwaldvogel.mongo.MongoServer;
import de.bwaldvogel.mongo.MongoVersion;
import de.bwaldvogel.mongo.backend.h2.H2Backend;
import de.bwaldvogel.mongo.backend.memory.MemoryBackend;
import de.bwaldvogel.mongo.bson.Document;
import io.netty.channel.Channel;

/**
 * Runs mongo-java-server for Zarkov's development and tests.
 *
 * <pre>
 * java -cp ... zarkov.javaserver.Main [-listen 127.0.0.1:27019] [-data DIR] [-log-level warn]
 * </pre>
 *
 * Without {@code -data} the data live in memory (the library's fastest backend) and
 * are gone when the process ends. With {@code -data DIR} they live in the H2 MVStore
 * file {@code DIR/zarkov.mv.db}, which survives a restart; every command that changed
 * something is committed to that file before its reply is sent, so an acknowledged
 * write survives a SIGKILL of this process (not a power loss: nothing is fsynced),
 * and renames are stored as such ({@link RenamingH2Database}).
 *
 * <p>The server reports MongoDB 5.0.0 with wire version 13: the library's own
 * {@code MONGO_5_0} reports wire version 8, which pymongo 4.18 and later refuse.
 * {@code buildInfo} also carries {@code mongoJavaServerVersion}, so that a client can
 * tell which server it talks to (as FerretDB's {@code ferretdbVersion} does).
 */
public final class Main {

    /** MongoDB 5.0 as pymongo expects it: wire version 13. */
    static final MongoVersion MONGO_5_0_WIRE_13 = new MongoVersion() {
        @Override
        public List<Integer> getVersionArray() {
            return List.of(5, 0, 0);
        }

        @Override
        public int getWireVersion() {
            return 13;
        }
    };

    static final String LIBRARY_VERSION = libraryVersion();

    private Main() {
    }

    public static void main(String[] args) throws Exception {
        String listen = "127.0.0.1:27019";
        String data = null;
        String logLevel = "warn";
        for (int i = 0; i < args.length; i++) {
            String arg = args[i];
            if (i + 1 >= args.length) {
                usage("missing value after " + arg);
            }
            switch (arg) {
                case "-listen" -> listen = args[++i];
                case "-data" -> data = args[++i];
                case "-log-level" -> logLevel = args[++i];
                default -> usage("unknown argument " + arg);
            }
        }
        // Before the first logger is made: slf4j-simple reads it once.
        System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", logLevel);

        int colon = listen.lastIndexOf(':');
        if (colon < 0) {
            usage("-listen wants host:port, got " + listen);
        }
        String host = listen.substring(0, colon);
        int port = Integer.parseInt(listen.substring(colon + 1));

        MongoBackend backend;
        String where;
        if (data == null) {
            backend = new ReportingMemoryBackend();
            where = "in memory";
        } else {
            Path dir = Path.of(data).toAbsolutePath();
            Files.createDirectories(dir);
            Path file = dir.resolve("zarkov.mv.db");
            backend = new CommittingH2Backend(file.toString());
            where = "in " + file;
        }
        backend.version(MONGO_5_0_WIRE_13);

        MongoServer server = new MongoServer(backend);
        server.bind(host, port);
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            server.shutdownNow(); // closes the backend: H2 writes and closes its file
            stopped.countDown();
        }, "shutdown"));
        System.err.printf("java-server: mongo-java-server %s listening on %s, data %s%n",
            LIBRARY_VERSION, listen, where);
        stopped.await();
    }

    private static void usage(String problem) {
        System.err.println("java-server: " + problem);
        System.err.println("usage: java-server [-listen host:port] [-data dir] [-log-level level]");
        System.exit(2);
    }

    private static String libraryVersion() {
        Properties p = new Properties();
        try (InputStream in = Main.class.getResourceAsStream("/zarkov-java-server.properties")) {
            if (in != null) {
                p.load(in);
            }
        } catch (IOException e) {
            // Only the reported version is lost.
        }
        return p.getProperty("mongo-java-server.version", "unknown");
    }

    /** The reply to {@code command}, with this launcher's additions. */
    static Document annotate(String command, Document reply) {
        if (command.equalsIgnoreCase("buildinfo")) {
            reply.put("mongoJavaServerVersion", LIBRARY_VERSION);
        }
        return reply;
    }

    /** The in-memory backend, naming itself in {@code buildInfo}. */
    static final class ReportingMemoryBackend extends MemoryBackend {
        @Override
        public Document handleCommand(Channel channel, String database, String command, Document query) {
            return annotate(command, super.handleCommand(channel, database, command, query));
        }
    }

    /**
     * The H2 backend, committing every change to its file before replying.
     *
     * <p>The MVStore would otherwise commit in the background about once a second, and
     * a SIGKILL would lose up to a second of acknowledged writes.
     */
    static final class CommittingH2Backend extends H2Backend {
        CommittingH2Backend(String file) {
            super(file);
        }

        @Override
        protected MongoDatabase openOrCreateDatabase(String databaseName) {
            return new RenamingH2Database(databaseName, getMvStore(), getCursorRegistry());
        }

        @Override
        public Document handleCommand(Channel channel, String database, String command, Document query) {
            Document reply = super.handleCommand(channel, database, command, query);
            if (getMvStore().hasUnsavedChanges()) {
                commit();
            }
            return annotate(command, reply);
        }
    }
}
